"""The output folder of a batch job: atomic shard files, per-shard journals and receipts, the merged manifest.

Layout of ``--out``::

    _manifest.json              the job (task, options, model and input fingerprints) and what is finished
    errors.jsonl                every failed row: {"image": ..., "error": "<reason>"} (merged from the receipts)
    part-000000.jsonl           the shard's good rows in input order (or .parquet with --format parquet)
    part-000000.npy             embed: float32 [rows, dim] (or .safetensors), row i = line i of part-000000.jsonl;
                                BLIP-2: [rows, Q, dim], one L2-normalised feature per query token
    index/                      embed: the search index (see blip.jobs.index)
    _receipts/part-000000.json  written last, atomically: the shard is finished (rows, errors, files)
    _work/part-000000.journal   a shard in progress: one line per finished batch, appended as it goes
    .blip.lock                  while a job runs: who holds the folder (see blip.jobs.lock)

The manifest names everything the job writes (``"owns"``: the names above, the shard files, a kind's own outputs
such as CapFilt's dataset); ``--overwrite`` deletes exactly that, and nothing that no manifest of ours names is
ever deleted: a folder without a manifest that holds anything is refused, so is a file the job would write.

How nothing is lost or duplicated under ``kill -9``:

- A batch's results are appended to the shard's journal as one line (header line first). A crash can leave at most
  a torn last line; recovery keeps the complete lines, which are always whole batches, and cuts the rest, so a rerun
  redoes at most the batch that was in flight.
- When a shard's last batch is journaled its output files are written to temporary names, fsynced and renamed into
  place; then its receipt is written the same way. The receipt is the commit point: a shard with a receipt is done
  and never touched again; one without is (re)built from its journal, overwriting any half-finished files.
- ``_manifest.json`` and ``errors.jsonl`` are summaries rebuilt from the receipts (atomically) by the one process
  that coordinates, so concurrent ranks or actors never write the same file.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blip.io import atomic_path, atomic_write_bytes, atomic_write_json, fsync_dir, jsonl_bytes
from blip.jobs.lock import LOCK

_logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "blip-batch/1"
MANIFEST = "_manifest.json"
ERRORS = "errors.jsonl"
RECEIPTS = "_receipts"
WORK = "_work"
INDEX = "index"
OUTPUT_FORMATS = ("jsonl", "parquet")
EMBED_FORMATS = ("npy", "safetensors")


class OutputError(ValueError):
    """``--out`` cannot take this job: a file, a folder that is not a blip job's, or one whose files it would
    overwrite."""


class JobMismatchError(OutputError):
    """The output folder holds results of a different job."""


_TEMPORARY = re.compile(r"\.(.+)\.\d+\.[0-9a-f]+\.tmp")  # blip.io's atomic writes: .<name>.<pid>.<hex>.tmp


@dataclass(frozen=True)
class Owned:
    """What a job writes in its output folder, as its manifest names it (``"owns"``): the names in `names`, the
    shard files ``<prefix>-000000.<ext>`` up to `count` shards, and their temporary files. A rerun with --overwrite
    deletes exactly these; nothing else in the folder is ever deleted."""

    names: tuple[str, ...]
    prefix: str = "part"
    extensions: tuple[str, ...] = ("jsonl",)
    count: int = 0

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name in self.names:
            return True
        match = re.fullmatch(rf"{re.escape(self.prefix)}-(\d{{6,}})\.(\w+)", name)
        if match is None or match[2] not in self.extensions:
            return False
        shard = int(match[1])
        return shard < self.count and match[1] == f"{shard:06d}"

    def is_temporary(self, name: str) -> bool:
        """A temporary file of an atomic write of one of ours (or the index being built)."""
        match = _TEMPORARY.fullmatch(name)
        if match is not None:
            return match[1] in self
        return name.startswith(f"{INDEX}.tmp-") and INDEX in self.names

    def to_json(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "shard_files": {"prefix": self.prefix, "extensions": list(self.extensions), "count": self.count},
        }

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Owned:
        owns = manifest.get("owns")
        if isinstance(owns, dict):
            shards = owns.get("shard_files") or {}
            return cls(
                tuple(owns.get("names", ())),
                str(shards.get("prefix", "part")),
                tuple(shards.get("extensions", ())),
                int(shards.get("count", 0)),
            )
        # a manifest from before "owns": its bookkeeping, the embed index, and the shard files it lists
        names = [MANIFEST, ERRORS, RECEIPTS, WORK] + ([INDEX] if manifest.get("job", {}).get("task") == "embed" else [])
        names += [f for shard in (manifest.get("shards") or {}).values() for f in shard.get("files", ())]
        return cls(tuple(names), count=0)


def shard_name(shard: int) -> str:
    return f"part-{shard:06d}"


# ---------------------------------------------------------------------------------------------------------------------
# Journals: one line per finished batch


@dataclass
class BatchRecord:
    """The results of one batch of a shard, rows `start .. start + len(items) - 1` of the shard."""

    start: int
    items: list[dict[str, Any]]  # per row, in order: {"ok": row} or {"error": error row}
    embeddings: np.ndarray | None = None  # [number of ok items, dim] or BLIP-2 [.., Q, dim] float32 (embed only)

    def to_line(self) -> bytes:
        obj: dict[str, Any] = {"start": self.start, "items": self.items}
        if self.embeddings is not None:
            emb = np.ascontiguousarray(self.embeddings, dtype=np.float32)
            obj["emb"] = {"shape": list(emb.shape), "data": base64.b64encode(emb.tobytes()).decode("ascii")}
        return (json.dumps(obj, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> BatchRecord:
        emb = None
        if obj.get("emb") is not None:
            shape = tuple(obj["emb"]["shape"])
            emb = np.frombuffer(base64.b64decode(obj["emb"]["data"]), dtype=np.float32).reshape(shape).copy()
        return cls(int(obj["start"]), list(obj["items"]), emb)


class Journal:
    """Append-only record of a shard in progress. Opening it recovers the complete batches already there."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.header = header
        self.records: list[BatchRecord] = []
        self._file = None
        self._recover()

    @property
    def rows_done(self) -> int:
        return self.records[-1].start + len(self.records[-1].items) if self.records else 0

    def _recover(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        good_bytes = 0
        try:
            header = json.loads(lines[0]) if len(lines) > 1 else None
        except json.JSONDecodeError:
            header = None
        if header != self.header:
            if header is not None:
                _logger.warning("%s belongs to another job or shard layout; starting the shard over", self.path)
            self.path.unlink()
            return
        good_bytes = len(lines[0]) + 1
        for line in lines[1:-1]:  # the last element follows the final newline: empty, or a torn line
            try:
                record = BatchRecord.from_obj(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                break
            if record.start != self.rows_done:
                break
            self.records.append(record)
            good_bytes += len(line) + 1
        if good_bytes < len(data):
            _logger.info("%s: dropping %d bytes of an unfinished batch", self.path, len(data) - good_bytes)
            with open(self.path, "rb+") as f:
                f.truncate(good_bytes)

    def append(self, record: BatchRecord) -> None:
        if record.start != self.rows_done:
            raise RuntimeError(f"{self.path}: batch starts at row {record.start}, expected {self.rows_done}")
        if self._file is None:
            new = not self.path.exists()
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open while the shard is in progress
            if new:
                self._file.write((json.dumps(self.header) + "\n").encode())
        self._file.write(record.to_line())
        self._file.flush()  # in the OS's hands now: survives the death of this process
        self.records.append(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# ---------------------------------------------------------------------------------------------------------------------
# The output folder


@dataclass
class Receipt:
    shard: int
    rows: int
    ok: int
    files: list[str]
    errors: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, job_fingerprint: str) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "name": shard_name(self.shard),
            "job": job_fingerprint,
            "rows": self.rows,
            "ok": self.ok,
            "failed": len(self.errors),
            "files": self.files,
            "errors": self.errors,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Receipt:
        return cls(int(obj["shard"]), int(obj["rows"]), int(obj["ok"]), list(obj["files"]), list(obj["errors"]))


@dataclass
class Summary:
    shards: int
    shards_done: int
    rows: int
    rows_done: int
    rows_ok: int
    rows_failed: int

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards


class OutputDir:
    """Everything about ``--out``: the job check, journals, shard commits, receipts and the merged summaries.

    `extra_outputs`: what the job writes in the folder besides the shards and the bookkeeping (the embed job's
    index, CapFilt's dataset); its manifest names them with the rest, so a later --overwrite may remove them."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        output_format: str = "jsonl",
        embed_format: str | None = None,
        file_prefix: str = "part",
        extra_outputs: tuple[str, ...] = (),
    ):
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"unknown output format {output_format!r}: use one of {', '.join(OUTPUT_FORMATS)}")
        if embed_format is not None and embed_format not in EMBED_FORMATS:
            raise ValueError(f"unknown embedding format {embed_format!r}: use one of {', '.join(EMBED_FORMATS)}")
        self.root = Path(root).expanduser().resolve()
        self.output_format = output_format
        self.embed_format = embed_format
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", file_prefix):
            raise ValueError(f"file_prefix must be a plain name, got {file_prefix!r}")
        self.file_prefix = file_prefix  # output files are <file_prefix>-000000.jsonl, ...
        self.extra_outputs = tuple(extra_outputs)
        self._receipts: dict[int, Receipt] = {}
        self._manifest_base: dict[str, Any] = {"format": MANIFEST_FORMAT}

    # --- paths ---------------------------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def receipt_path(self, shard: int) -> Path:
        return self.root / RECEIPTS / f"{shard_name(shard)}.json"

    def journal_path(self, shard: int) -> Path:
        return self.root / WORK / f"{shard_name(shard)}.journal"

    def owned(self, num_shards: int) -> Owned:
        """What a job of `num_shards` shards writes here."""
        extensions = ["parquet" if self.output_format == "parquet" else "jsonl"]
        if self.embed_format is not None:
            extensions.append(self.embed_format)
        names = (MANIFEST, ERRORS, RECEIPTS, WORK, *self.extra_outputs)
        return Owned(names, self.file_prefix, tuple(extensions), num_shards)

    # --- the job -------------------------------------------------------------------------------------------------

    def check_folder(self) -> None:
        """`OutputError` when ``--out`` names a file."""
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(
                f"--out {self.root} is a file, not a folder: choose a folder (--overwrite replaces earlier results "
                f"in a folder, never a file)"
            )

    def read_manifest(self) -> dict[str, Any] | None:
        """The folder's manifest when a blip job wrote it; None when there is none (or it is someone else's file)."""
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            raise OutputError(
                f"{self.manifest_path} is unreadable ({e}): this folder can be neither resumed nor overwritten; move "
                f"it away or choose another --out"
            ) from e
        return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None

    def prepare(
        self, job: dict[str, Any], fingerprint: str, *, overwrite: bool, num_shards: int, model_source: str = ""
    ) -> bool:
        """Coordinator only, holding the folder's lock (`blip.jobs.lock`), before any work: check that `job` may
        resume here, or start it. Returns True when earlier results are being resumed.

        Only what a manifest of ours names is ever deleted (with --overwrite): a folder without one that holds
        anything is refused, and so is one holding a file this job would write that no manifest names."""
        self.check_folder()
        manifest = self.read_manifest()
        ours = self.owned(num_shards)
        if manifest is not None and not overwrite:
            if manifest.get("fingerprint") != fingerprint:
                message = describe_mismatch(
                    self.root,
                    manifest.get("job", {}),
                    job,
                    old_model=manifest.get("model_source"),
                    new_model=model_source,
                )
                raise JobMismatchError(message)
        else:
            present = self._present(ours)
            if manifest is None and present and not overwrite:
                raise OutputError(
                    f"{self.root} is not empty ({_some(present)}) and holds no {MANIFEST}: not a blip batch output "
                    f"folder. Choose an empty or new --out (or --overwrite to write beside what is there)"
                )
            before = Owned.from_manifest(manifest) if manifest is not None else Owned(())
            clash = [n for n in present if n in ours and n not in before and not before.is_temporary(n)]
            if clash:
                raise OutputError(
                    f"{self.root} holds {_some(clash)}, which this job would write but no {MANIFEST} of a blip job "
                    f"names: nothing of yours is deleted, so move {'them' if len(clash) > 1 else 'it'} away or "
                    f"choose another --out"
                )
            if manifest is not None:
                self._clear(before)
            manifest = None
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_temporary_files(ours)
        resuming = manifest is not None
        now = _now()
        started = manifest.get("started", now) if manifest else now
        self._manifest_base = {
            "format": MANIFEST_FORMAT,
            "fingerprint": fingerprint,
            "job": job,
            "model_source": model_source,
            "started": started,
            "owns": ours.to_json(),
        }
        if not resuming:
            self.write_manifest(num_shards, Summary(num_shards, 0, job["input"]["rows"], 0, 0, 0), {})
        (self.root / RECEIPTS).mkdir(exist_ok=True)
        (self.root / WORK).mkdir(exist_ok=True)
        return resuming

    def _present(self, ours: Owned) -> list[str]:
        """What is in the folder, but for its lock and our temporary files."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.name != LOCK and not ours.is_temporary(p.name))

    def clear(self) -> None:
        """Remove what the folder's manifest says a job wrote here (and nothing else), the manifest last."""
        manifest = self.read_manifest()
        if manifest is not None:
            self._clear(Owned.from_manifest(manifest))

    def _clear(self, owned: Owned) -> None:
        for path in sorted(self.root.iterdir()):
            if path.name == MANIFEST or (path.name not in owned and not owned.is_temporary(path.name)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        self.manifest_path.unlink()
        self._receipts.clear()

    def _remove_temporary_files(self, ours: Owned) -> None:
        """Leftovers of a killed run: temporary files, and journals of shards committed just before the kill."""
        for path in self.root.iterdir():
            if ours.is_temporary(path.name):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
        for folder in (self.root / RECEIPTS, self.root / WORK):
            for path in folder.glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        done = self.done_shards()
        for shard in done:
            with contextlib.suppress(FileNotFoundError):
                self.journal_path(shard).unlink()

    def tidy(self) -> None:
        """A finished job keeps no empty work folder."""
        with contextlib.suppress(OSError):
            (self.root / WORK).rmdir()

    # --- shards --------------------------------------------------------------------------------------------------

    def done_shards(self) -> set[int]:
        folder = self.root / RECEIPTS
        if not folder.is_dir():
            return set()
        done = set()
        for path in folder.glob("part-*.json"):
            with contextlib.suppress(ValueError):
                done.add(int(path.stem.split("-", 1)[1]))
        return done

    def open_journal(self, shard: int, header: dict[str, Any]) -> Journal:
        return Journal(self.journal_path(shard), header)

    def commit(self, shard: int, rows: int, records: list[BatchRecord], job_fingerprint: str) -> Receipt:
        """Write a finished shard's files atomically, then its receipt (the commit point)."""
        ok_rows: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        embeddings: list[np.ndarray] = []
        for record in records:
            for item in record.items:
                if "ok" in item:
                    ok_rows.append(item["ok"])
                else:
                    errors.append(item["error"])
            if record.embeddings is not None:
                embeddings.append(record.embeddings)
        if sum(len(r.items) for r in records) != rows:
            raise RuntimeError(f"shard {shard}: {sum(len(r.items) for r in records)} results for {rows} rows")
        name = f"{self.file_prefix}-{shard:06d}"
        files = [self._write_rows(name, ok_rows)]
        if self.embed_format is not None:
            matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32)
            if len(matrix) != len(ok_rows):
                raise RuntimeError(f"shard {shard}: {len(matrix)} embeddings for {len(ok_rows)} rows")
            files.append(self._write_embeddings(name, matrix))
        fsync_dir(self.root)
        receipt = Receipt(shard, rows, len(ok_rows), files, errors)
        atomic_write_json(self.receipt_path(shard), receipt.to_json(job_fingerprint))
        fsync_dir(self.root / RECEIPTS)
        return receipt

    def _write_rows(self, name: str, rows: list[dict[str, Any]]) -> str:
        if self.output_format == "parquet":
            pa, pq = import_pyarrow()
            path = self.root / f"{name}.parquet"
            with atomic_path(path) as tmp:
                pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            path = self.root / f"{name}.jsonl"
            atomic_write_bytes(path, jsonl_bytes(rows))
        return path.name

    def _write_embeddings(self, name: str, matrix: np.ndarray) -> str:
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        if self.embed_format == "safetensors":
            from safetensors.numpy import save_file

            path = self.root / f"{name}.safetensors"
            with atomic_path(path) as tmp:
                save_file({"embeddings": matrix}, str(tmp))
        else:
            path = self.root / f"{name}.npy"
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, matrix)
        return path.name

    # --- summaries -----------------------------------------------------------------------------------------------

    def receipts(self) -> dict[int, Receipt]:
        """Every committed shard's receipt (each read once; receipts never change)."""
        for shard in sorted(self.done_shards() - set(self._receipts)):
            obj = json.loads(self.receipt_path(shard).read_text(encoding="utf-8"))
            self._receipts[shard] = Receipt.from_json(obj)
        return dict(sorted(self._receipts.items()))

    def summarize(self, num_shards: int, total_rows: int, receipts: dict[int, Receipt] | None = None) -> Summary:
        if receipts is None:
            receipts = self.receipts()
        return Summary(
            shards=num_shards,
            shards_done=len(receipts),
            rows=total_rows,
            rows_done=sum(r.rows for r in receipts.values()),
            rows_ok=sum(r.ok for r in receipts.values()),
            rows_failed=sum(len(r.errors) for r in receipts.values()),
        )

    def write_summaries(self, num_shards: int, total_rows: int, extra: dict[str, Any] | None = None) -> Summary:
        """Coordinator: rebuild errors.jsonl and _manifest.json from the receipts (atomically)."""
        receipts = self.receipts()
        summary = self.summarize(num_shards, total_rows, receipts)
        errors = [e for r in receipts.values() for e in r.errors]
        atomic_write_bytes(self.root / ERRORS, jsonl_bytes(errors), fsync=False)
        self.write_manifest(num_shards, summary, receipts, extra)
        return summary

    def write_manifest(
        self, num_shards: int, summary: Summary, receipts: dict[int, Receipt], extra: dict[str, Any] | None = None
    ) -> None:
        manifest = dict(self._manifest_base)
        manifest.update(
            {
                "updated": _now(),
                "complete": summary.complete,
                "num_shards": num_shards,
                "rows": summary.rows,
                "rows_done": summary.rows_done,
                "rows_ok": summary.rows_ok,
                "rows_failed": summary.rows_failed,
                "errors_file": ERRORS,
                "shards": {
                    shard_name(s): {"rows": r.rows, "ok": r.ok, "failed": len(r.errors), "files": r.files}
                    for s, r in receipts.items()
                },
            }
        )
        if extra:
            manifest.update(extra)
        atomic_write_json(self.manifest_path, manifest, fsync=False)


def describe_mismatch(
    root: Path, old: dict[str, Any], new: dict[str, Any], *, old_model: str | None = None, new_model: str | None = None
) -> str:
    changes = [c for c in _diff(old, new, "") if not c.startswith("model.")]
    if old.get("model") != new.get("model"):
        changes.insert(0, f"the model differs: was {old_model or 'another checkpoint'}, now {new_model or 'this one'}")
    listed = "; ".join(changes[:8]) + ("; ..." if len(changes) > 8 else "")
    return (
        f"{root} holds results of a different job ({listed or 'the job fingerprint differs'}). Rerun with the "
        f"original options to resume, use --overwrite to discard those results, or choose another --out"
    )


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in dict.fromkeys([*old, *new]):
            out += _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    if old == new:
        return []
    return [f"{prefix} was {_short(old)}, now {_short(new)}"]


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def import_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RuntimeError("--format parquet needs pyarrow: pip install pyarrow") from e
    return pa, pq
