"""Self-describing training checkpoints: written atomically, read with `weights_only=True`.

A checkpoint (`<out_dir>/checkpoint.pt`) holds everything a resume or an evaluation needs and nothing else:

    format, version       "blip-train-checkpoint", 1
    model                 the BlipModel state dict (our key layout; `blip.load(path, config=...)` reads it too)
    model_config          the BlipConfig as a dict
    tokenizer             the tokenizer files (tokenizer.json, tokenizer_config.json) as text
    task, task_state      the training task and its own state: momentum encoders, queues, temperature, draw counter
    train_config          the resolved TrainConfig as a dict
    optimizer, scheduler  AdamW state; the schedule's parameters
    step, epoch, micro_in_epoch, world_size
    rng                   per rank: python, numpy, torch (and CUDA) generator states
    metrics               the last logged values

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the old checkpoint, so a
kill at any moment leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip.config import BlipConfig, TextConfig, VisionConfig
from blip.tokenizer import TOKENIZER_FILES, BlipTokenizer

FORMAT = "blip-train-checkpoint"
VERSION = 1


class CheckpointFormatError(ValueError):
    """Not a blip training checkpoint, or one this version cannot read."""


# --- RNG state ---------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's generator states, in types `torch.load(weights_only=True)` accepts."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- files -------------------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (tensors on CPU, `weights_only=True`)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointFormatError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointFormatError(f"{path} is not a blip training checkpoint")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointFormatError(f"{path} has checkpoint version {ckpt['version']}; this blip reads {VERSION}")
    return ckpt


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_file() or path.suffix not in (".pt", ".pth", ".ckpt"):
        return False
    try:  # mmap: read the header, not the tensors (this runs on every .pt/.pth that blip.load opens)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


# --- what describes the model ------------------------------------------------------------------------------------


def config_to_dict(config: BlipConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> BlipConfig:
    return BlipConfig(
        vision=VisionConfig(**data["vision"]),
        text=TextConfig(**data["text"]),
        kind=data["kind"],
        embed_dim=int(data["embed_dim"]),
    )


def tokenizer_to_dict(tokenizer: BlipTokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {name: (Path(tmp) / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES}


def tokenizer_from_dict(files: dict[str, str], source: str = "checkpoint") -> BlipTokenizer:
    """The tokenizer stored in a checkpoint, built in memory: its file names are a fixed set, never paths."""
    return BlipTokenizer.from_files(files, source=source)
