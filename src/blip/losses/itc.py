"""Image-text contrastive loss (ITC) with momentum encoders, feature queues and momentum distillation.

Per pair (docs/training.md): online features are compared with momentum features of the current (global) batch and of
a queue of earlier batches; the targets mix the ground truth with the momentum model's own softmax,
`alpha * softmax(sim_m) + (1 - alpha) * onehot`, and the loss is `(i2t + t2i) / 2`. The momentum encoders follow
the online ones by `p_m = m * p_m + (1 - m) * p`, once per optimizer step, before the forward.

Across ranks the in-batch candidates are the momentum features of *all* ranks (gathered, no gradient), so a run's
loss depends on the global batch only and not on how it is split over processes. (The original code compared with
its local batch plus the queue; after one step the queue holds every rank's features either way.)

With `idx` (retrieval fine-tuning), every candidate with the same image id is a positive, including queued ones:
the targets are the positives' indicator normalised to sum to one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip.distributed import concat_all_gather, get_rank

MOMENTUM_PARTS = ("vision_model", "text_encoder", "vision_proj", "text_proj")
TEMP_RANGE = (0.001, 0.5)
NO_IMAGE = -100  # idx_queue filler: matches no real image id


class MomentumEncoder(nn.Module):
    """Exponential-moving-average copies of what makes ITC features: the ViT, the unimodal text encoder and the two
    projections. They never receive gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for part in MOMENTUM_PARTS:
            module = getattr(model, part, None)
            if module is None:
                raise ValueError(f"ITC needs a model with {', '.join(MOMENTUM_PARTS)}; {part} is missing")
            setattr(self, part, copy.deepcopy(module))
        for p in self.parameters():
            p.requires_grad_(False)

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = []
        for part in MOMENTUM_PARTS:
            online = dict(getattr(model, part).named_parameters())
            for name, p_m in getattr(self, part).named_parameters():
                pairs.append((p_m, online[name]))
        return pairs

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        for p_m, p in self._pairs(model):
            p_m.copy_(p)

    @torch.no_grad()
    def update(self, model: nn.Module, momentum: float) -> None:
        """`p_m = momentum * p_m + (1 - momentum) * p` for every parameter pair."""
        pairs = self._pairs(model)
        params_m = [p_m for p_m, _ in pairs]
        params = [p.detach().to(p_m.dtype) for p_m, p in pairs]
        torch._foreach_mul_(params_m, momentum)
        torch._foreach_add_(params_m, params, alpha=1.0 - momentum)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised `[B, D]` momentum image features."""
        return F.normalize(self.vision_proj(self.vision_model(pixel_values)[:, 0]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised `[B, D]` momentum text features ([CLS] at position 0, no image)."""
        states = self.text_encoder(input_ids, attention_mask, first_only=True)
        return F.normalize(self.text_proj(states[:, 0]), dim=-1)


@dataclass
class ITCOutput:
    """The loss plus what ITM hard-negative mining needs (all detached; `*_all` gathered over ranks, rank order)."""

    loss: torch.Tensor
    image_feat_all: torch.Tensor  # online image features of the global batch [Bg, D]
    text_feat_all: torch.Tensor  # online text features [Bg, D]
    image_feat_m_all: torch.Tensor  # momentum image features [Bg, D]
    text_feat_m_all: torch.Tensor  # momentum text features [Bg, D]
    idx_all: torch.Tensor | None  # image ids of the global batch [Bg] (retrieval), else None
    temp: torch.Tensor  # the clamped temperature used


def contrastive_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_bank: torch.Tensor,
    text_bank: torch.Tensor,
    i2t_targets: torch.Tensor,
    t2i_targets: torch.Tensor,
    temp: torch.Tensor | float,
) -> torch.Tensor:
    """`(CE(image_feat @ text_bank / temp, i2t_targets) + CE(text_feat @ image_bank / temp, t2i_targets)) / 2` with
    soft targets, each CE averaged over rows. Banks are `[D, K]` (candidates as columns)."""
    sim_i2t = image_feat @ text_bank / temp
    sim_t2i = text_feat @ image_bank / temp
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * i2t_targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t2i_targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


class ContrastiveLoss(nn.Module):
    """ITC as a module: owns the momentum encoder, the queues and the learnable temperature.

    Call `momentum_update(model)` once per optimizer step before the forward; set `alpha` (the distillation weight,
    ramped by the task) before each step. `forward` enqueues the global batch's momentum features when training.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        embed_dim: int,
        queue_size: int,
        momentum: float = 0.995,
        temp: float = 0.07,
        alpha: float = 0.4,
        use_idx: bool = False,
    ):
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.alpha = alpha
        self.use_idx = use_idx
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.momentum_encoder = MomentumEncoder(model)
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, queue_size), NO_IMAGE, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def queue_size(self) -> int:
        return self.image_queue.shape[1]

    def momentum_update(self, model: nn.Module) -> None:
        self.momentum_encoder.update(model, self.momentum)

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """Write `[N, D]` features at the pointer (wrapping around; the newest `queue_size` win) and advance it."""
        n = image_feat_m.shape[0]
        if n > self.queue_size:
            image_feat_m, text_feat_m = image_feat_m[-self.queue_size :], text_feat_m[-self.queue_size :]
            idx = None if idx is None else idx[-self.queue_size :]
            n = self.queue_size
        # The pointer stays on the device: no host sync per step.
        slots = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % self.queue_size
        self.image_queue[:, slots] = image_feat_m.T.to(self.image_queue.dtype)
        self.text_queue[:, slots] = text_feat_m.T.to(self.text_queue.dtype)
        if idx is not None:
            self.idx_queue[0, slots] = idx.to(self.idx_queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue_size)

    def forward(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        idx: torch.Tensor | None = None,
    ) -> ITCOutput:
        """`image_feat`, `text_feat`: this rank's L2-normalised online features `[B, D]`; the pixels and text are
        what the momentum encoder reads; `idx` `[B]` image ids (required when built with `use_idx`)."""
        if self.use_idx and idx is None:
            raise ValueError("this ITC loss was built for retrieval fine-tuning and needs image ids (idx)")
        batch = image_feat.shape[0]
        with torch.autocast(image_feat.device.type, enabled=False):
            with torch.no_grad():
                self.temp.clamp_(*TEMP_RANGE)
                image_feat_m = self.momentum_encoder.image_features(pixel_values).float()
                text_feat_m = self.momentum_encoder.text_features(input_ids, attention_mask).float()
                image_feat_m_all = concat_all_gather(image_feat_m)
                text_feat_m_all = concat_all_gather(text_feat_m)
                image_bank = torch.cat([image_feat_m_all.T, self.image_queue.clone()], dim=1)  # (D, Bg + Q)
                text_bank = torch.cat([text_feat_m_all.T, self.text_queue.clone()], dim=1)
                idx_all = None
                if self.use_idx:
                    idx_all = concat_all_gather(idx)
                    candidates = torch.cat([idx_all, self.idx_queue[0].clone()])
                    positive = (idx.view(-1, 1) == candidates.view(1, -1)).float()
                    targets = positive / positive.sum(1, keepdim=True)
                else:
                    targets = torch.zeros(batch, image_bank.shape[1], device=image_feat.device)
                    rows = torch.arange(batch, device=image_feat.device)
                    targets[rows, get_rank() * batch + rows] = 1.0
                temp = self.temp.detach()
                if self.alpha > 0:
                    sim_i2t_m = image_feat_m @ text_bank / temp
                    sim_t2i_m = text_feat_m @ image_bank / temp
                    i2t_targets = self.alpha * F.softmax(sim_i2t_m, dim=1) + (1 - self.alpha) * targets
                    t2i_targets = self.alpha * F.softmax(sim_t2i_m, dim=1) + (1 - self.alpha) * targets
                else:
                    i2t_targets = t2i_targets = targets
            loss = contrastive_loss(
                image_feat.float(), text_feat.float(), image_bank, text_bank, i2t_targets, t2i_targets, self.temp
            )
        if self.training:
            self.enqueue(image_feat_m_all, text_feat_m_all, idx_all)
        return ITCOutput(
            loss=loss,
            image_feat_all=concat_all_gather(image_feat.detach().float()),
            text_feat_all=concat_all_gather(text_feat.detach().float()),
            image_feat_m_all=image_feat_m_all,
            text_feat_m_all=text_feat_m_all,
            idx_all=idx_all,
            temp=temp,
        )
