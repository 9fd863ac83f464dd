"""Optimizer and learning-rate schedule.

AdamW with betas (0.9, 0.999) and weight decay 0.05 (docs/training.md), fused on CUDA, multi-tensor on the CPU
(`adamw_kernel`). The original decays every parameter; with
`decay_1d=False` biases, LayerNorm weights, embeddings' 1-D tables and the temperature are left undecayed (LAVIS).
The schedule is a pure function of the step (linear warmup from `warmup_lr`, then cosine down to `min_lr`, or
constant), so its state is the step alone and resuming sets it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def param_groups(module: nn.Module, weight_decay: float, decay_1d: bool = True) -> list[dict]:
    """Two groups: decayed, and (unless `decay_1d`) the 1-D / scalar parameters without decay. Frozen parameters
    (momentum encoders) are left out; shared parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for _, p in module.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if decay_1d or p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    module: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    decay_1d: bool = True,
) -> torch.optim.AdamW:
    groups = param_groups(module, weight_decay, decay_1d)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **adamw_kernel([p for g in groups for p in g["params"]]))


def adamw_kernel(params: list[torch.Tensor]) -> dict[str, bool]:
    """How AdamW updates `params`: one fused kernel per step when they are all floating-point CUDA tensors;
    `foreach` (a few multi-tensor ops per step instead of a dozen Python-dispatched ops per parameter) when they are
    all on the CPU; PyTorch's own choice otherwise (mixed devices, other accelerators, nothing to train)."""
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    if params and all(p.device.type == "cpu" for p in params):
        return {"foreach": True}
    return {}


@dataclass(frozen=True)
class LRSchedule:
    """lr(step): linear warmup from `warmup_lr` to `lr` over `warmup_steps`, then cosine to `min_lr` at
    `total_steps` (or constant)."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    kind: str = "cosine"

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "lr": self.lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_lr": self.warmup_lr,
            "min_lr": self.min_lr,
        }
