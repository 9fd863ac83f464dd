"""Devices, in one place: every command line's `--device` flag and its default, and `resolve_device` (the one place
a device name becomes a checked `torch.device`). Used by `blip.load`, training, the batch jobs, CapFilt, the server
and every command line. torch is imported only when a device is resolved, so that command lines can build their
parsers (and `blip --help` answer) without loading it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_DEVICE = "auto"  # every command line's --device default: a GPU when there is one, else the CPU
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def add_device_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Every command line's `--device`, with the one default."""
    parser.add_argument("--device", default=DEFAULT_DEVICE, help=f"{DEVICE_CHOICES} (auto: a GPU when there is one)")


class DeviceError(ValueError):
    """A device that cannot be used in this process; the message is one line saying why and what to use instead."""


def resolve_device(device: str | torch.device | None = DEFAULT_DEVICE, local_rank: int | None = None) -> torch.device:
    """A device name as a checked `torch.device`: "auto" (or None) is cuda when CUDA is available, else cpu; "cuda"
    is cuda:<local_rank> when a local rank is given (torchrun), else the current CUDA device.

    Raises DeviceError (one line) for a name torch does not know, CUDA on a CPU-only build or a machine without a
    visible GPU, a GPU index past the ones visible, or MPS/XPU where they are not available — instead of a long torch
    traceback at the first tensor moved there."""
    import torch

    check_device_name(device)
    spec = str(device if device is not None else "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and local_rank is not None:
        spec = f"cuda:{local_rank}"
    dev = torch.device(spec)
    _check_available(dev, str(device))
    return dev


def check_device_name(device: str | torch.device | None) -> None:
    """Only that `device` is a name `resolve_device` understands, not that this machine has it (a Ray driver picks
    devices for actors on other machines). Raises DeviceError."""
    import torch

    spec = str(device if device is not None else "auto").strip().lower()
    if spec == "auto":
        return
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {str(device)!r}: use {DEVICE_CHOICES}") from None
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise DeviceError(f"device {str(device)!r}: not a device blip runs on; use {DEVICE_CHOICES}")


def _check_available(dev: torch.device, name: str) -> None:
    import torch

    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise DeviceError(
                f"device {name!r}: this PyTorch is a CPU-only build (no CUDA support); use cpu (or auto), or install "
                f"a CUDA build of PyTorch"
            )
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r}: no CUDA GPU is visible to this process (driver, CUDA_VISIBLE_DEVICES?); use cpu"
            )
        count = torch.cuda.device_count()
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= count:
            visible = "cuda:0" if count == 1 else f"cuda:0 .. cuda:{count - 1}"
            raise DeviceError(f"device {str(dev)!r}: only {count} CUDA GPU{'s' * (count != 1)} visible ({visible})")
        return
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r}: MPS is not available here (Apple silicon only); use cpu")
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise DeviceError(f"device {name!r}: no Intel XPU is available here; use cpu")
