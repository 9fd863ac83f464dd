"""Distributed wiring, in one place: torchrun environment, process group, rank helpers, the gathers (devices are
`blip.devices`). Used by the losses, training, the batch jobs and CapFilt.

Launch with `torchrun --nproc_per_node N -m blip.cli train ...` (or plain `blip train ...` for one process). The
backend is NCCL on CUDA and gloo on CPU. With one process every helper here is a cheap identity, so the training
code calls them unconditionally.

Two gathers, as the objectives need them:
- `concat_all_gather(x)`: no gradient (momentum features for the queues, token ids, similarity rows);
- `all_gather_with_grad(x)`: the gathered tensor keeps its graph, and the gradient that any rank's loss sends into
  another rank's slice is summed back to its owner (ITM hard negatives taken from other ranks' images).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from blip.devices import resolve_device

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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
