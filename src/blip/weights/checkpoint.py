"""Our training-checkpoint format: self-describing, written atomically, read with `weights_only=True`.

A checkpoint (`<out_dir>/checkpoint.pt`, written by `blip train`) holds everything a resume or an evaluation needs:

    format, version       "blip-train-checkpoint", 1
    model                 the BlipModel state dict (our key layout)
    model_config          the BlipConfig as a dict
    tokenizer             the tokenizer files (tokenizer.json, tokenizer_config.json, ...) as text, by fixed names
    task, task_state      the training task and its own state: momentum encoders, queues, temperature, draw counter
    train_config          the resolved TrainConfig as a dict
    optimizer, scheduler  AdamW state; the schedule's parameters
    step, epoch, micro_in_epoch, world_size
    rng                   per rank: python, numpy, torch (and CUDA) generator states
    metrics               the last logged values

`blip.load` reads the model, its config and its tokenizer from it (`blip.weights.load`); the trainer writes and
resumes it (`blip.train.loop`). Writes go to a temporary file in the same folder, are flushed to disk, then renamed
over the old checkpoint, so a kill at any moment leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from blip.config import BlipConfig, TextConfig, VisionConfig
from blip.tokenizer import TOKENIZER_FILES, BlipTokenizer
from blip.weights.errors import CheckpointError
from blip.weights.read import read_torch_file

FORMAT = "blip-train-checkpoint"
VERSION = 1
SUFFIXES = (".pt", ".pth", ".ckpt")


class CheckpointFormatError(CheckpointError):
    """Not a blip training checkpoint, or one this version cannot read."""


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


def is_checkpoint_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def check_version(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    version = ckpt.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointFormatError(f"{path} has checkpoint version {version!r}; this blip reads up to {VERSION}")
    return ckpt


def load_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """Read a training checkpoint (tensors on CPU, `weights_only=True`; memory-mapped when `mmap`)."""
    ckpt = read_torch_file(Path(path), mmap=mmap)
    if not is_checkpoint_dict(ckpt):
        raise CheckpointFormatError(f"{path} is not a blip training checkpoint")
    return check_version(ckpt, path)


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is one of ours. Reads the header only (the pickle, with the tensors memory-mapped)."""
    path = Path(path)
    if not path.is_file() or path.suffix not in SUFFIXES:
        return False
    try:
        return is_checkpoint_dict(read_torch_file(path, mmap=True))
    except CheckpointError:
        return False


# --- what describes the model ------------------------------------------------------------------------------------


def config_to_dict(config: BlipConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: Any, source: str = "checkpoint") -> BlipConfig:
    """The stored `model_config`, validated (`BlipConfig.validate`): `CheckpointError` names the field."""
    try:
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("vision"), dict)
            or not isinstance(data.get("text"), dict)
        ):
            raise ValueError("expected {'vision': {...}, 'text': {...}, 'kind': ..., 'embed_dim': ...}")
        config = BlipConfig(
            vision=VisionConfig(**data["vision"]),
            text=TextConfig(**data["text"]),
            kind=data["kind"],
            embed_dim=data["embed_dim"],
        )
        return config.validate()
    except (KeyError, TypeError, ValueError) as e:
        detail = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{source}: model_config: {detail}") from e


def tokenizer_to_dict(tokenizer: BlipTokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {name: (Path(tmp) / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES}


def tokenizer_from_dict(files: dict[str, str], source: str = "checkpoint") -> BlipTokenizer:
    """The tokenizer stored in a checkpoint, built in memory: its file names are a fixed set, never paths."""
    try:
        return BlipTokenizer.from_files(files, source=source)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def model_entries(ckpt: dict[str, Any], source: str) -> tuple[dict[str, torch.Tensor], BlipConfig, Any]:
    """(state dict, validated config, tokenizer files) of a training checkpoint."""
    state = ckpt.get("model")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointFormatError(f"{source}: the 'model' entry is not a state dict of tensors")
    return state, config_from_dict(ckpt.get("model_config"), source), ckpt.get("tokenizer")
