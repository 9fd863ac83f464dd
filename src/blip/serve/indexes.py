"""Collection indexes served by `POST /v1/retrieve`: `--index NAME=DIR[@MODEL]` specs, and opening each index with
the served model it belongs to.

An index (``<DIR>/index/`` from `blip batch embed`) holds ITC image embeddings; text and image queries must be
embedded by the same checkpoint, or the scores mean nothing. The index records a fingerprint of that checkpoint
(the hash of every byte of its files, see `blip.weights.fingerprint`), so by default the index goes with the
served model whose checkpoint has that fingerprint. ``@MODEL`` names the served model instead (needed when the index
records no fingerprint); a served model whose fingerprint differs from the recorded one is refused either way, as
`blip retrieve --model` refuses it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from blip.tasks.retrieval import INDEX, CollectionIndex, Fetch, SearchIndexError, load_collection_index

if TYPE_CHECKING:
    from blip.api import Blip


class IndexSetupError(ValueError):
    """An index cannot be served: the message names the index, its folder and the problem."""


@dataclass(frozen=True)
class IndexSpec:
    """An index to serve: `path` is the `blip batch embed` output folder (or its index/ folder); `model` the served
    model it goes with (None: the one whose checkpoint fingerprint the index records); `tokenizer` the --tokenizer
    the models were loaded with (part of the checkpoint fingerprint)."""

    path: str
    model: str | None = None
    tokenizer: str | None = None


@dataclass
class ServedIndex:
    name: str
    model: str
    collection: CollectionIndex
    path: str

    @property
    def count(self) -> int:
        return len(self.collection.rows)


def _default_name(path: str) -> str:
    folder = Path(path.rstrip("/" + os.sep))
    if folder.name == INDEX and folder.parent.name:
        folder = folder.parent
    return folder.name or path


def split_name(spec: str) -> tuple[str, str]:
    """A `--model`/`--index` value "NAME=REST" -> (NAME, REST); ("", spec) when it names nothing (no "=", or what
    stands before it is empty or a path)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or "/" in name or os.sep in name:
        return "", spec
    return name, rest


def parse_indexes(specs: Iterable[str], models: Iterable[str], tokenizer: str | None = None) -> dict[str, IndexSpec]:
    """["photos=out/@retrieval", "out2/"] -> {"photos": IndexSpec("out/", "retrieval"), "out2": IndexSpec("out2/")}.

    The text after the last "@" names a model only when it is one of `models` (a folder may contain "@")."""
    names = list(models)
    indexes: dict[str, IndexSpec] = {}
    for spec in specs:
        name, rest = split_name(spec)
        path, at, model = rest.rpartition("@")
        if not at or model not in names:
            if at and model and path and not Path(rest).expanduser().exists() and Path(path).expanduser().exists():
                raise ValueError(f"--index {spec!r}: no model named {model!r} to go with the index; have {names}")
            path, model = rest, ""
        if not path:
            raise ValueError(f"--index {spec!r}: no folder (give NAME=DIR, DIR the output of `blip batch embed`)")
        name = name or _default_name(path)
        if name in indexes:
            raise ValueError(f"--index {spec!r}: the name {name!r} is used twice (give NAME=DIR)")
        indexes[name] = IndexSpec(path, model or None, tokenizer)
    return indexes


def check_index_folder(name: str, spec: IndexSpec) -> None:
    """The cheap start-up check, before any model loads: the folder holds an index."""
    folder = Path(spec.path).expanduser()
    if not (folder / INDEX / "index.json").is_file() and not (folder / "index.json").is_file():
        problem = "no such folder" if not folder.exists() else f"no {INDEX}/index.json here"
        raise IndexSetupError(
            f"--index {name}={spec.path}: {problem} (expected the output folder of `blip batch embed`)"
        )


def _fingerprint(blip: Blip, tokenizer: str | None) -> str | None:
    from blip.weights.fingerprint import model_fingerprint

    try:
        return str(model_fingerprint(blip.source, tokenizer)["sha256"])
    except Exception:  # noqa: BLE001 - a model that is not a checkpoint on disk has no fingerprint
        return None


def open_index(name: str, spec: IndexSpec, models: dict[str, Blip], fetch: Fetch | None = None) -> ServedIndex:
    """Open the index and bind it to its model; `IndexSetupError` names the index folder and the problem. `fetch`
    reads the collection's http(s) rows when text queries are re-ranked."""
    where = f"--index {name}={spec.path}"
    check_index_folder(name, spec)
    try:
        collection = load_collection_index(spec.path, fetch=fetch)
    except SearchIndexError as e:
        raise IndexSetupError(f"{where}: {e}") from e
    except (OSError, ValueError, KeyError) as e:
        raise IndexSetupError(f"{where}: cannot read the index ({type(e).__name__}: {e})") from e
    meta = collection.meta
    recorded = (meta.get("model") or {}).get("sha256")
    embedded_by = meta.get("model_source") or "an unrecorded checkpoint"
    retrieval = {n: m for n, m in models.items() if "itc" in m.tasks}
    if spec.model is not None:
        if spec.model not in models:
            raise IndexSetupError(f"{where}: no model named {spec.model!r}; have {sorted(models)}")
        if spec.model not in retrieval:
            raise IndexSetupError(
                f"{where}: model {spec.model!r} has no ITC head ({models[spec.model]!r}); an index needs the "
                "retrieval model that embedded it"
            )
        found = _fingerprint(models[spec.model], spec.tokenizer) if recorded else None
        if recorded and found is not None and found != recorded:
            raise IndexSetupError(
                f"{where}: model {spec.model!r} ({models[spec.model].source}) is not the checkpoint that embedded "
                f"this collection ({embedded_by}); its ITC space would not match"
            )
        model = spec.model
    else:
        if not recorded:
            raise IndexSetupError(f"{where}: the index does not record its model: give {where}@MODEL")
        matching = [n for n, m in retrieval.items() if _fingerprint(m, spec.tokenizer) == recorded]
        if not matching:
            served = ", ".join(f"{n} ({m.source})" for n, m in retrieval.items()) or "none"
            raise IndexSetupError(
                f"{where}: the collection was embedded by {embedded_by}, which is not among the served retrieval "
                f"models ({served}): serve that checkpoint with --model"
            )
        model = matching[0]
    try:  # the model's family and feature shape (BLIP-2: Q features per image) must be the index's
        collection.check_model(models[model])
    except SearchIndexError as e:
        raise IndexSetupError(f"{where}: model {model!r}: {e}") from e
    if len(collection.rows) != int(meta.get("count", -1)):
        raise IndexSetupError(f"{where}: {len(collection.rows)} rows but index.json says {meta.get('count')}")
    return ServedIndex(name, model, collection, spec.path)


def open_indexes(
    specs: dict[str, IndexSpec], models: dict[str, Blip], fetch: Fetch | None = None
) -> dict[str, ServedIndex]:
    return {name: open_index(name, spec, models, fetch) for name, spec in specs.items()}
