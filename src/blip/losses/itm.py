"""Image-text matching loss (ITM) with hard negatives mined from the contrastive similarities.

For every text one negative image, and for every image one negative text, are sampled with probability
proportional to the softmax of the ITC similarities, so that similar-looking but wrong pairs are picked more often
(docs/training.md). The positive is never sampled: the diagonal (or, for retrieval with image ids, every pair of the
same image) has weight zero. The ITM batch is the B positives plus the 2B negatives, labels `[1]*B + [0]*2B`,
cross-entropy. Negatives written into the data (a manifest's `negatives` column: texts false for their image, e.g.
a true caption with one colour swapped) add one more row each.

Two variants, as in the original code:
- pretraining: similarities of the online features against the *momentum* features, `softmax + 1e-4`;
- retrieval fine-tuning: online against online, same-image pairs zeroed, no `1e-4`.

With `all_ranks`, negatives come from the global batch: the image tokens are gathered with gradient (the negatives'
gradients flow back to the rank that owns them) and the token ids without. Sampling draws for the whole global
batch from a generator seeded by `(seed, call count)` and each rank keeps its rows, so the pairs picked do not
depend on the number of processes, and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from blip.distributed import all_gather_with_grad, all_reduce_max, concat_all_gather, get_rank
from blip.losses.itc import ITCOutput

_logger = logging.getLogger(__name__)

PRETRAIN_EPS = 1e-4


def negative_weights(sim: torch.Tensor, positive: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """`softmax(sim, 1) + eps` with positives zeroed. A row with no negative mass left (e.g. every candidate shows
    the same image) falls back to uniform over its non-positives; a row with no non-positive at all stays zero and
    must not be sampled."""
    weights = F.softmax(sim.float(), dim=1) + eps
    weights = weights.masked_fill(positive, 0.0)
    empty = weights.sum(1, keepdim=True) <= 0
    return torch.where(empty, (~positive).float(), weights)  # no data-dependent branch: no host sync on GPUs


def sample_negatives(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One column index per row, drawn proportionally to `weights` `[R, C]` (rows must have positive mass)."""
    if weights.device.type == "cpu" and bool((weights.sum(1) <= 0).any()):  # checked where it costs no sync
        raise ValueError("a row has no possible negative: every candidate is a positive (batch of one image?)")
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def pad_to(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad `[B, T]` ids and mask to `length` columns."""
    extra = length - ids.shape[1]
    if extra <= 0:
        return ids, mask
    return F.pad(ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=0)


class MatchingLoss(nn.Module):
    """ITM as a module. `forward(model, image_embeds, ids, mask, itc)` returns the loss; `model` provides
    `image_cross_kv`, `encode_multimodal` and `itm_logits`."""

    def __init__(self, *, use_momentum: bool = True, eps: float = PRETRAIN_EPS, all_ranks: bool = True, seed: int = 0):
        super().__init__()
        self.use_momentum = use_momentum
        self.eps = eps
        self.all_ranks = all_ranks
        self.seed = seed
        self.calls = 0  # seeds the draws; saved with the state (`get_extra_state`)

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed * 1_000_003 + self.calls) % (2**63))
        return generator

    @torch.no_grad()
    def pick_negatives(self, itc: ITCOutput, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative image per text, negative text per image) for this rank's `batch` rows, as indices into the
        candidate pool (the global batch with `all_ranks`, else this rank's batch)."""
        image_feat, text_feat = itc.image_feat_all, itc.text_feat_all
        image_side, text_side = (
            (itc.image_feat_m_all, itc.text_feat_m_all) if self.use_momentum else (image_feat, text_feat)
        )
        idx = itc.idx_all
        rank = get_rank()
        if not self.all_ranks:  # this rank's rows only
            rows = slice(rank * batch, (rank + 1) * batch)
            image_feat, text_feat, image_side, text_side = (
                t[rows] for t in (image_feat, text_feat, image_side, text_side)
            )
            idx = None if idx is None else idx[rows]
        pool = image_feat.shape[0]
        if idx is not None:
            positive = idx.view(-1, 1) == idx.view(1, -1)
        else:
            positive = torch.eye(pool, dtype=torch.bool, device=image_feat.device)
        w_t2i = negative_weights(text_feat @ image_side.T / itc.temp, positive, self.eps)  # texts -> images
        w_i2t = negative_weights(image_feat @ text_side.T / itc.temp, positive, self.eps)  # images -> texts
        generator = self._generator(w_t2i.device)
        neg_images = sample_negatives(w_t2i, generator)
        neg_texts = sample_negatives(w_i2t, generator)
        if self.training:
            self.calls += 1
        offset = rank * batch if self.all_ranks else 0
        return neg_images[offset : offset + batch], neg_texts[offset : offset + batch]

    def forward(
        self,
        model: nn.Module,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        itc: ITCOutput,
        pad_id: int = 0,
        written: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`image_embeds` `[B, N, D]`, text `[B, T]` with the ITM start token already at position 0. `written`:
        negatives from the data, `(ids [K, T'], mask [K, T'], owner [K])` - each text false for this rank's image
        `owner` - added as K more negative rows."""
        batch = input_ids.shape[0]
        neg_images, neg_texts = self.pick_negatives(itc, batch)
        if self.all_ranks:
            length = all_reduce_max(input_ids.shape[1], input_ids.device)
            input_ids, attention_mask = pad_to(input_ids, attention_mask, length, pad_id)
            image_pool = all_gather_with_grad(image_embeds)
            ids_pool, mask_pool = concat_all_gather(input_ids), concat_all_gather(attention_mask)
            own = torch.arange(batch, device=input_ids.device) + get_rank() * batch
        else:
            image_pool, ids_pool, mask_pool = image_embeds, input_ids, attention_mask
            own = torch.arange(batch, device=input_ids.device)
        # Rows: (image, text) positives, (negative image, text), (image, negative text).
        ids = torch.cat([input_ids, input_ids, ids_pool[neg_texts]])
        mask = torch.cat([attention_mask, attention_mask, mask_pool[neg_texts]])
        image_rows = torch.cat([own, neg_images, own])
        if written is not None:  # (image, a text written to be false for it)
            w_ids, w_mask, owner = written
            length = max(ids.shape[1], w_ids.shape[1])
            ids, mask = pad_to(ids, mask, length, pad_id)
            w_ids, w_mask = pad_to(w_ids, w_mask, length, pad_id)
            ids, mask = torch.cat([ids, w_ids]), torch.cat([mask, w_mask])
            image_rows = torch.cat([image_rows, own[owner]])
        cross = model.image_cross_kv(image_pool, index=image_rows)
        states = model.encode_multimodal(ids, mask, cross=cross, first_only=True)
        logits = model.itm_logits(states).float()
        labels = torch.zeros(ids.shape[0], dtype=torch.long, device=logits.device)
        labels[:batch] = 1
        return F.cross_entropy(logits, labels)
