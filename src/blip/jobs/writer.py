"""The output folder of a batch job: atomic shard files, per-shard journals and receipts, the merged manifest.

Layout of ``--out``::

    _manifest.json              the job (task, options, model and input fingerprints) and what is finished
    errors.jsonl                every failed row: {"image": ..., "error": "<reason>"} (merged from the receipts)
    part-000000.jsonl           the shard's good rows in input order (or .parquet with --format parquet)
    part-000000.npy             embed: float32 [rows, dim] (or .safetensors), row i = line i of part-000000.jsonl
    index/                      embed: the search index (see blip.jobs.index)
    _receipts/part-000000.json  written last, atomically: the shard is finished (rows, errors, files)
    _work/part-000000.journal   a shard in progress: one line per finished batch, appended as it goes

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blip.io import atomic_path, atomic_write_bytes, atomic_write_json, fsync_dir, jsonl_bytes

_logger = logging.getLogger(__name__)

FORMAT = "blip-batch/1"
MANIFEST = "_manifest.json"
ERRORS = "errors.jsonl"
RECEIPTS = "_receipts"
WORK = "_work"
INDEX = "index"
OUTPUT_FORMATS = ("jsonl", "parquet")
EMBED_FORMATS = ("npy", "safetensors")
_PART_FILE = re.compile(r"part-\d{6,}\.(jsonl|parquet|npy|safetensors)")


class JobMismatchError(ValueError):
    """The output folder holds results of a different job."""


def shard_name(shard: int) -> str:
    return f"part-{shard:06d}"


# ---------------------------------------------------------------------------------------------------------------------
# Journals: one line per finished batch


@dataclass
class BatchRecord:
    """The results of one batch of a shard, rows `start .. start + len(items) - 1` of the shard."""

    start: int
    items: list[dict[str, Any]]  # per row, in order: {"ok": row} or {"error": error row}
    embeddings: np.ndarray | None = None  # [number of ok items, dim] float32 (embed only)

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
    """Everything about ``--out``: the job check, journals, shard commits, receipts and the merged summaries."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        output_format: str = "jsonl",
        embed_format: str | None = None,
        file_prefix: str = "part",
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
        self._receipts: dict[int, Receipt] = {}
        self._manifest_base: dict[str, Any] = {"format": FORMAT}

    # --- paths ---------------------------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def receipt_path(self, shard: int) -> Path:
        return self.root / RECEIPTS / f"{shard_name(shard)}.json"

    def journal_path(self, shard: int) -> Path:
        return self.root / WORK / f"{shard_name(shard)}.journal"

    # --- the job -------------------------------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            raise JobMismatchError(f"{self.manifest_path} is unreadable ({e}); use --overwrite to start over") from e

    def prepare(
        self, job: dict[str, Any], fingerprint: str, *, overwrite: bool, num_shards: int, model_source: str = ""
    ) -> bool:
        """Coordinator only, before any work: check that `job` may resume here (or start it), clear leftovers.
        Returns True when earlier results are being resumed."""
        manifest = self.read_manifest()
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
        elif manifest is None and not overwrite:
            foreign = [p.name for p in self.root.iterdir() if not self.is_ours(p.name)] if self.root.is_dir() else []
            if foreign:
                raise JobMismatchError(
                    f"{self.root} is not empty ({', '.join(sorted(foreign)[:3])}, ...) and holds no {MANIFEST}: not a "
                    f"blip batch output folder. Choose an empty or new --out (or --overwrite to write into it anyway)"
                )
        if overwrite or manifest is None:
            self.clear()
            manifest = None
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_temporary_files()
        resuming = manifest is not None
        now = _now()
        started = manifest.get("started", now) if manifest else now
        self._manifest_base = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "job": job,
            "model_source": model_source,
            "started": started,
        }
        if not resuming:
            self.write_manifest(num_shards, Summary(num_shards, 0, job["input"]["rows"], 0, 0, 0), {})
        (self.root / RECEIPTS).mkdir(exist_ok=True)
        (self.root / WORK).mkdir(exist_ok=True)
        return resuming

    def clear(self) -> None:
        """Remove what a batch job writes here (and nothing else)."""
        if not self.root.exists():
            return
        for path in self.root.iterdir():
            if not self.is_ours(path.name):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        self._receipts.clear()

    def _remove_temporary_files(self) -> None:
        """Leftovers of a killed run: temporary files, and journals of shards committed just before the kill."""
        for folder in (self.root, self.root / RECEIPTS, self.root / WORK):
            for path in folder.glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for path in self.root.glob(f"{INDEX}.tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
        done = self.done_shards()
        for shard in done:
            with contextlib.suppress(FileNotFoundError):
                self.journal_path(shard).unlink()

    def is_ours(self, name: str) -> bool:
        """Whether `name` (in the output folder) is something a batch job writes there."""
        if _is_ours(name):
            return True
        return self.file_prefix != "part" and re.fullmatch(rf"{self.file_prefix}-\d{{6,}}\.\w+", name) is not None

    def tidy(self) -> None:
        """A finished job keeps no empty work folder."""
        with contextlib.suppress(OSError):
            (self.root / WORK).rmdir()

    def check(self, fingerprint: str) -> None:
        """Non-coordinators: the coordinator's manifest must describe the same job."""
        manifest = self.read_manifest()
        if manifest is None or manifest.get("fingerprint") != fingerprint:
            raise JobMismatchError(
                f"{self.manifest_path} does not describe this process's job: did the input change while the job "
                f"started? (fingerprint {manifest and manifest.get('fingerprint')} vs {fingerprint})"
            )

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
            dim = next((e.shape[1] for e in embeddings if e.ndim == 2), 0)
            matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)
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

    def summarize(self, num_shards: int, total_rows: int) -> Summary:
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
        summary = self.summarize(num_shards, total_rows)
        receipts = self.receipts()
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


def _is_ours(name: str) -> bool:
    """Names a batch job writes in its output folder."""
    return (
        name in (MANIFEST, ERRORS, RECEIPTS, WORK, INDEX)
        or _PART_FILE.fullmatch(name) is not None
        or (name.startswith(".") and name.endswith(".tmp"))
        or name.startswith(f"{INDEX}.tmp-")
    )


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


class Throttle:
    """True at most every `seconds` (and on the first call)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._last = -float("inf")

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.seconds:
            self._last = now
            return True
        return False
