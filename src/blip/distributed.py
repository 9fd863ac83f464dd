"""Distributed wiring and devices, in one place: torchrun environment, process group, rank helpers, the gathers,
and `resolve_device` (the one place a device name becomes a checked `torch.device`). Used by the losses, training,
the batch jobs, CapFilt, `blip.load` and every command line.

Launch with `torchrun --nproc_per_node N -m blip.cli train ...` (or plain `blip train ...` for one process). The
backend is NCCL on CUDA and gloo on CPU. With one process every helper here is a cheap identity, so the training
code calls them unconditionally.

Two gathers, as the objectives need them:
- `concat_all_gather(x)`: no gradient (momentum features for the queues, token ids, similarity rows);
- `all_gather_with_grad(x)`: the gathered tensor keeps its graph, and the gradient that any rank's loss sends into
  another rank's slice is summed back to its owner (ITM hard negatives taken from other ranks' images).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_info_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun / SLURM environment; (0, 0, 1) when launched plainly."""
    for rank_key, local_key, world_key in (
        ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
        ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
    ):
        if world_key in os.environ and rank_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ.get(local_key, 0)), int(os.environ[world_key])
    return 0, 0, 1


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


def init_distributed_device(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA) and pick this rank's device."""
    rank, local_rank, world_size = world_info_from_env()
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
        _logger.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, dev)
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (same shape on every rank) from all ranks along dim 0, rank order. No gradient."""
    if not is_dist():
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every rank holds the gradient of its own loss with respect to the whole gathered tensor: sum them, then
        # keep this rank's slice. (DDP later averages parameter gradients over ranks, matching the averaged loss.)
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.size
        return grad[start : start + ctx.size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks along dim 0, keeping the autograd graph (same shape on every rank)."""
    if not is_dist():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor, no gradient)."""
    out = tensor.detach().clone()
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) / get_world_size()


def all_reduce_max(value: int, device: torch.device) -> int:
    if not is_dist():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_object(obj: object) -> list[object]:
    if not is_dist():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
