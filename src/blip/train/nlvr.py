"""NLVR2 fine-tuning: pair data with the swap augmentation, the collator, the cross-entropy objective.

Augmentation (the original `nlvr_dataset`): with probability 0.5 the two images trade places and the words "left"
and "right" trade places in the statement, so the label stays true to the pair. The images go through one ViT pass
(`cat([a, b])`, split after), the statement (with `[ENC]` at position 0) through the twin cross-attention encoder,
and the `[ENC]` state through `cls_head`; loss = cross-entropy against the label (1 = true).
"""

from __future__ import annotations

import random
import re
from typing import Any

import torch
import torch.nn.functional as F

from blip.data.nlvr import NlvrPair
from blip.models.blip import BlipModel
from blip.tokenizer import BlipTokenizer
from blip.train.collate import pre_caption
from blip.train.datasets import ImageFn, _ImageRows
from blip.train.objectives import Batch, TrainTask
from blip.transforms import load_image

_SIDE = re.compile(r"\b(left|right)(?=(?:most)?\b)", re.IGNORECASE)  # "left", "leftmost"; not "leftover"
MAX_WORDS = 40  # the original's pre_caption(sentence, 40)


def swap_left_right(text: str) -> str:
    """ "left" <-> "right" (also in "leftmost"/"rightmost"), keeping the case: lower, Capitalised or UPPER."""

    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _SIDE.sub(swap, text)


def swap_pair(image_a: Any, image_b: Any, statement: str, rng: random.Random, p: float = 0.5) -> tuple[Any, Any, str]:
    """The NLVR2 augmentation: with probability `p`, (b, a, statement with left/right swapped); else unchanged."""
    if rng.random() < p:
        return image_b, image_a, swap_left_right(statement)
    return image_a, image_b, statement


class NlvrDataset(_ImageRows):
    """Pairs -> `{"pixels_a", "pixels_b": [3, S, S], "statement": str, "label": int}`; keys `(epoch, index)`.

    With `swap`, the pair augmentation above (its draw is part of the sample's RNG: any worker count and any resume
    point see the same). An image that fails to decode replaces the pair by the next one (counted)."""

    empty_error = "no usable NLVR pairs"
    exhausted_error = "no pair of this dataset has decodable images"

    def __init__(self, rows: list[NlvrPair], image_fn: ImageFn, seed: int = 0, swap: bool = True):
        super().__init__(rows, image_fn, seed)
        self.swap = swap

    def _decode(self, row: NlvrPair) -> tuple[Any, Any]:
        return load_image(row.image_a), load_image(row.image_b)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        row, (a, b), rng = self._decoded(key)
        statement = row.statement
        if self.swap:
            a, b, statement = swap_pair(a, b, statement, rng)
        return {
            "pixels_a": self.image_fn(a, rng),
            "pixels_b": self.image_fn(b, rng),
            "statement": statement,
            "label": int(row.label),
        }


class NlvrCollator:
    """-> `pixel_values [2B, 3, S, S]` (the B left images, then the B right ones), `input_ids`/`attention_mask`
    `[B, T]` with `[ENC]` at position 0, `labels [B]`."""

    def __init__(self, tokenizer: BlipTokenizer, enc_token_id: int, max_length: int = 64):
        self.tokenizer, self.enc_token_id, self.max_length = tokenizer, enc_token_id, max_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = self.tokenizer([pre_caption(i["statement"], MAX_WORDS) for i in items], max_length=self.max_length)
        ids[:, 0] = self.enc_token_id
        pixels = [i["pixels_a"] for i in items] + [i["pixels_b"] for i in items]
        return {
            "pixel_values": torch.stack(pixels),
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([i["label"] for i in items], dtype=torch.long),
        }


class NlvrTask(TrainTask):
    """Cross-entropy of `cls_head` on the `[ENC]` state; one ViT pass over both images of every pair."""

    def __init__(self, model: BlipModel):
        super().__init__()
        self.model = model

    def training_forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        model = self.model
        image_embeds = model.encode_image(batch["pixel_values"])  # (2B, N, D)
        image_a, image_b = image_embeds.chunk(2)
        logits = model.reason_logits(batch["input_ids"], batch["attention_mask"], image_a, image_b)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean().detach()
        return {"nlvr_loss": loss, "train_accuracy": accuracy, "loss": loss}
