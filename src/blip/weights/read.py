"""Reading weight files: safetensors, a sharded index, or a torch pickle (`weights_only=True`), with one-line errors.

Errors say what the file is not and what was expected. torch's own messages are never passed on: for a refused
pickle they advise `weights_only=False`, which would run code from the file.
"""

from __future__ import annotations

import json
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
    is read from the memory-mapped file (None: kept), so a bf16 load never holds the whole fp32 model in memory."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        if dtype_of is None:
            return load_file(str(path))
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(key)
                target = dtype_of(key)
                if target is not None and tensor.is_floating_point() and tensor.dtype != target:
                    tensor = tensor.to(target)
                out[key] = tensor
        return out
    except Exception as e:  # SafetensorError, OSError: short, self-contained messages
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason}); {EXPECTED}") from e


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
