"""Reading weight files: safetensors, a sharded index, or a torch pickle (`weights_only=True`), with one-line errors.

Errors say what the file is not and what was expected. torch's own messages are never passed on: for a refused
pickle they advise `weights_only=False`, which would run code from the file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from blip.weights.errors import CheckpointError

EXPECTED = (
    "expected a Hugging Face folder (config.json + model.safetensors), a .safetensors file, an original BLIP .pth "
    "or a blip training checkpoint.pt"
)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since PyTorch 1.6
PICKLE_PROTOCOL = b"\x80"  # the legacy format: a bare pickle


def read_torch_file(path: Path, *, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; zip files are memory-mapped when `mmap` (tensors are read
    lazily). Raises `CheckpointError` for anything that is not a readable torch file of tensors and containers."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if head.startswith(ZIP_MAGIC):
        kind = "zip"
    elif head.startswith(PICKLE_PROTOCOL):
        kind, mmap = "pickle", False  # legacy pickles cannot be memory-mapped
    else:
        what = "a text file" if _looks_like_text(path) else f"a file starting with {head!r}"
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (it is {what}, not a zip archive or pickle); {EXPECTED}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of files it then refuses anyway
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} is not a checkpoint blip can read: its pickle is damaged or holds objects other than tensors "
            f"and plain containers, which blip never unpickles (that could run code from the file); {EXPECTED}"
        ) from e
    except Exception as e:  # zip damage, truncation, unsupported records: torch's messages are long and misleading
        raise CheckpointError(
            f"{path} is a damaged or truncated PyTorch {kind} file ({type(e).__name__}); {EXPECTED}"
        ) from e


def read_safetensors(
    path: Path, dtype_of: Callable[[str], torch.dtype | None] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file. With `dtype_of(key)`, each floating tensor is cast to that dtype as it
    is read (None: kept), so a bf16 load never holds the whole fp32 model in memory."""
    from safetensors.torch import load_file

    try:
        if dtype_of is None:
            return load_file(str(path))
        return _read_safetensors_cast(path, dtype_of)
    except Exception as e:  # SafetensorError, OSError: short, self-contained messages
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason}); {EXPECTED}") from e


# safetensors dtype names -> torch dtypes (the little-endian layout every safetensors file has).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _read_safetensors_cast(path: Path, dtype_of: Callable[[str], torch.dtype | None]) -> dict[str, torch.Tensor]:
    """Read a safetensors file tensor by tensor with plain reads (8-byte header length, JSON header, then the data),
    casting each to `dtype_of(key)` as it arrives: the peak is the cast model plus one tensor as stored, never the
    whole file (a memory map would keep every touched page of the fp32 file resident until it is unmapped)."""
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= MAX_HEADER:
            raise ValueError(f"header length {size} is not a safetensors header")
        header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        base = 8 + size
        file_size = os.fstat(f.fileno()).st_size
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda item: _offset(item[1]))
        scratch = bytearray()  # one buffer, reused, for the tensors that are cast (their stored bytes are transient)
        for key, info in entries:
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"{key}: unsupported dtype {info.get('dtype')!r}")
            start, end = (int(n) for n in info["data_offsets"])
            shape = [int(n) for n in info["shape"]]
            # Checked before any allocation: a crafted header must not make us reserve memory the file cannot fill.
            if not 0 <= start <= end <= file_size - base or any(n < 0 for n in shape):
                raise ValueError(f"{key}: data offsets {start}..{end} lie outside the file")
            if math.prod(shape) * dtype.itemsize != end - start:
                raise ValueError(f"{key}: shape {shape} does not fit its {end - start} bytes")
            target = dtype_of(key)
            cast = target is not None and dtype.is_floating_point and dtype != target
            if cast and len(scratch) < end - start:
                scratch = bytearray(end - start)
            if cast:
                data = memoryview(scratch)[: end - start]
                kept = None
            else:  # kept as read: in torch's allocator, 64-byte aligned (the CPU kernels read aligned rows faster)
                kept = torch.empty(end - start, dtype=torch.uint8)
                data = memoryview(kept.numpy())
            f.seek(base + start)
            if f.readinto(data) != end - start:
                raise ValueError(f"{key}: the file ends inside its data (truncated)")
            if end == start:
                tensor = torch.empty(0, dtype=dtype)
            elif kept is not None:
                tensor = kept.view(dtype)
            else:
                tensor = torch.frombuffer(data, dtype=dtype)
            out[key] = tensor.reshape(shape).to(target) if cast else tensor.reshape(shape)
    return out


def _offset(info: Any) -> int:
    return info["data_offsets"][0] if isinstance(info, dict) and "data_offsets" in info else -1


def index_shards(index_path: Path) -> list[Path]:
    """The shard files a `*.index.json` names, each checked to lie inside the index's own folder (after resolving
    symlinks): an absolute name, `..` or a link leading elsewhere is refused, never read."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {index_path}: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no weight_map (a JSON object of parameter name -> shard file)")
    folder = index_path.parent.resolve()
    shards = []
    for name in sorted(set(weight_map.values()), key=str):
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index_path}: weight_map names a shard that is not a file name: {name!r}")
        relative = Path(name)
        resolved = (folder / relative).resolve()
        if relative.is_absolute() or ".." in relative.parts or not resolved.is_relative_to(folder):
            raise CheckpointError(
                f"{index_path}: weight_map names {name[:200]!r}, which is outside the checkpoint folder; shard files "
                f"must be inside {folder}"
            )
        if not resolved.is_file():
            raise CheckpointError(f"{index_path}: the shard {name!r} does not exist")
        shards.append(resolved)
    return shards


def _looks_like_text(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            sample = f.read(512)
        sample.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return all(c >= 32 or c in (9, 10, 13) for c in sample)
