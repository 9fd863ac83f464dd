"""A checkpoint's identity: the SHA-256 of every byte of its weights, config and tokenizer files.

Batch jobs record it to refuse resuming with another model, retrieval indexes to refuse a query model whose ITC
space differs. Every byte counts (a tensor zeroed in the middle of a file changes it); each file is hashed once and
its digest cached by (path, size, mtime_ns, inode) in a small JSON file outside the model folder:
`$BLIP_CACHE_DIR`, else `$XDG_CACHE_HOME/blip`, else `~/.cache/blip`. A cache that cannot be read or written is
ignored (the files are hashed again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
MODEL_FILES = (
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",  # transformers 5 processors keep the image settings here
    "vocab.json",  # BLIP-2 OPT: GPT-2 BPE
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)
CACHE_FILE = "fingerprints.json"
CACHE_ENTRIES = 4096  # the newest are kept
CHUNK = 8 * 1024 * 1024


def cache_dir() -> Path:
    if os.environ.get("BLIP_CACHE_DIR"):
        return Path(os.environ["BLIP_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "blip"


def model_files(source: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> list[Path]:
    """The files that make a checkpoint: a single weights file, or a folder's weights, config and tokenizer files;
    plus the tokenizer's when it comes from elsewhere."""
    from blip.weights.load import locate

    path = locate(source)
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p for p in path.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in MODEL_FILES)
        )
    if tokenizer:
        tok = Path(tokenizer).expanduser()
        files += sorted(p for p in tok.iterdir() if p.is_file() and p.name in MODEL_FILES) if tok.is_dir() else [tok]
    return files


def model_fingerprint(source: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> dict[str, Any]:
    """Identifies a checkpoint by content (every byte of its files), not by path: `{"sha256", "files"}`."""
    files = model_files(source, tokenizer)
    cache = _read_cache()
    changed = False
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        key = str(file.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = cache.get(key)
        if isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("sha256"), str):
            file_hash = entry["sha256"]
        else:
            file_hash = file_sha256(file)
            cache.pop(key, None)
            cache[key] = {"stat": stamp, "sha256": file_hash}
            changed = True
        digest.update(f"{file.name}:{stat.st_size}:{file_hash}\n".encode())
    if changed:
        _write_cache(cache)
    return {"sha256": digest.hexdigest(), "files": [p.name for p in files]}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads((cache_dir() / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RuntimeError):  # RuntimeError: no home folder to expand ~ in
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: dict[str, Any]) -> None:
    if len(cache) > CACHE_ENTRIES:
        cache = dict(list(cache.items())[-CACHE_ENTRIES:])
    try:
        folder = cache_dir()
    except RuntimeError:  # no home folder (and no BLIP_CACHE_DIR / XDG_CACHE_HOME): the cache is only a shortcut
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_FILE}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(cache, f)
            os.replace(tmp, folder / CACHE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        _logger.debug("fingerprint cache %s not written: %s", folder, e)
