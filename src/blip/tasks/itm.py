"""Image-text matching (ITM head) and contrastive similarity / embeddings (ITC projections)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from blip.tasks.common import MAX_TEXT_TOKENS, chunks, group_rows, image_input

if TYPE_CHECKING:
    from blip.api import Blip


@torch.inference_mode()
def match_probabilities(blip: Blip, images: list[Image.Image], texts: list[str], image_index: list[int]) -> list[float]:
    """P(match) for each (images[image_index[t]], texts[t]) pair from the ITM head."""
    model = blip.model
    device = next(model.parameters()).device
    out = [0.0] * len(texts)
    for chunk in chunks(len(texts), blip.batch_size):
        rows = list(chunk)
        used = sorted({image_index[r] for r in rows})
        local = {img: i for i, img in enumerate(used)}
        owner = [local[image_index[r]] for r in rows]
        order, per_image = group_rows(owner, len(used))
        ids, mask = blip.tokenizer([texts[rows[o]] for o in order], max_length=MAX_TEXT_TOKENS)
        image_embeds = model.encode_image(image_input(blip, [images[i] for i in used], model))
        index = None if per_image else torch.tensor([owner[o] for o in order], device=device)
        cross = model.image_cross_kv(image_embeds, index=index)
        states = model.encode_multimodal(ids.to(device), mask.to(device), cross=cross, first_only=True)
        probs = model.itm_logits(states).float().softmax(-1)[:, 1].tolist()
        for position, o in enumerate(order):
            out[rows[o]] = probs[position]
    return out


@torch.inference_mode()
def image_embeddings(blip: Blip, images: list[Image.Image]) -> torch.Tensor:
    """L2-normalised ITC image features `[n, embed_dim]` (float32, on CPU)."""
    feats = []
    for chunk in chunks(len(images), blip.batch_size):
        pixels = image_input(blip, [images[i] for i in chunk], blip.model)
        feats.append(blip.model.image_features(blip.model.encode_image(pixels)).float().cpu())
    return torch.cat(feats)


@torch.inference_mode()
def text_embeddings(blip: Blip, texts: list[str]) -> torch.Tensor:
    """L2-normalised ITC text features `[n, embed_dim]` (float32, on CPU); [CLS] at position 0, no image.

    Texts are batched by token length, so short texts are not padded to the longest one in the call."""
    device = next(blip.model.parameters()).device
    encoded = [blip.tokenizer.encode(t, max_length=MAX_TEXT_TOKENS) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    feats = torch.empty(len(texts), blip.config.embed_dim)
    pad = blip.tokenizer.pad_token_id
    for rows in _length_buckets(order, [len(e) for e in encoded]):
        length = len(encoded[rows[-1]])
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(encoded[r])] = torch.tensor(encoded[r])
            mask[i, : len(encoded[r])] = 1
        states = blip.model.encode_text(ids.to(device), mask.to(device), first_only=True)
        feats[torch.tensor(rows)] = blip.model.text_features(states).float().cpu()
    return feats


def _length_buckets(order: list[int], lengths: list[int], token_budget: int = 256) -> list[list[int]]:
    """Split rows sorted by length into batches of at most `token_budget` padded tokens (at least one row each)."""
    buckets: list[list[int]] = [[]]
    for row in order:
        if buckets[-1] and (len(buckets[-1]) + 1) * lengths[row] > token_budget:
            buckets.append([])
        buckets[-1].append(row)
    return buckets


def similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """`[n_images, E]` x `[n_texts, E]` -> ITC cosine `[n_images, n_texts]` (the features are L2-normalised)."""
    return image_feats @ text_feats.T
