"""File helpers shared by every writer: atomic writes (bytes, JSON, or anything written to a path) and JSONL.

An atomic write goes to a temporary file beside the target, is fsynced (unless asked not to) and renamed over the
target, so a reader (or a rerun after `kill -9`) sees the old file or the new one, never half of one. A rename is
made durable by fsyncing the folder (`fsync_dir`); writers that rename several files do it once after the last.

    with atomic_path(path) as tmp:          # e.g. torch.save(obj, tmp), or a writer that wants a path
        write_something(tmp)
    fsync_dir(path.parent)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "fsync_dir",
    "json_bytes",
    "jsonl_bytes",
    "read_jsonl",
]


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames in `folder` durable (silently skipped where a folder cannot be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yields a temporary path next to `path`; on success it is fsynced and renamed over `path`, else removed."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def json_bytes(obj: Any, *, indent: int | None = 1) -> bytes:
    """`obj` as UTF-8 JSON text ending with a newline."""
    return (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = True) -> None:
    atomic_write_bytes(path, json_bytes(obj), fsync=fsync)


def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    """One JSON object per line (UTF-8, not ASCII-escaped)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every object of a JSONL file we wrote (blank lines skipped; a broken line raises)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
