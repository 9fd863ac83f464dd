"""BLIP-2 image-text matching and contrastive features (`Blip2ForImageTextRetrieval`): the same functions, with the
same signatures, as `blip.tasks.itm` for BLIP, so the API, the server's micro-batches and the batch jobs call either.

The differences are in the shapes: an image has one ITC feature per query token (`[n, Q, E]`), and the similarity of
an image and a text is the largest cosine over those Q features (transformers' `use_image_text_matching_head=False`);
P(match) is the softmax of the ITM logits averaged over the query outputs. Texts are cut at the Q-Former's positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from PIL import Image

from blip.tasks.common import chunks, image_input

if TYPE_CHECKING:
    from blip.api import Blip2


def encode_images(
    blip: Blip2, images: list[Image.Image], head: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """The image tokens `[n, N, Dv]` of each image (or `head` of them), the images through the ViT in chunks of the
    batch size, each once."""
    parts = []
    for chunk in chunks(len(images), blip.batch_size):
        pixels = image_input(blip, [images[i] for i in chunk], blip.model.vision_model)
        embeds = blip.model.encode_image(pixels)
        parts.append(head(embeds) if head is not None else embeds)
    return torch.cat(parts)


def _tokenize(blip: Blip2, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = blip.tokenizer(texts, max_length=blip.config.qformer.max_position_embeddings)
    return ids.to(blip.device), mask.to(blip.device)


@torch.inference_mode()
def match_probabilities(
    blip: Blip2, images: list[Image.Image], texts: list[str], image_index: list[int]
) -> list[float]:
    """P(match) for each (images[image_index[t]], texts[t]) pair; each distinct image is encoded once."""
    embeds = encode_images(blip, images)  # (n_images, N, Dv)
    out: list[float] = []
    for chunk in chunks(len(texts), blip.batch_size):
        rows = list(chunk)
        ids, mask = _tokenize(blip, [texts[r] for r in rows])
        image = embeds[torch.tensor([image_index[r] for r in rows], device=embeds.device)]
        out += blip.model.itm_logits(image, ids, mask).float().softmax(-1)[:, 1].tolist()
    return out


@torch.inference_mode()
def image_embeddings(blip: Blip2, images: list[Image.Image]) -> torch.Tensor:
    """L2-normalised query features `[n, Q, E]` (float32, on CPU): one per query token."""
    return encode_images(blip, images, lambda embeds: blip.model.image_features(embeds).float().cpu())


@torch.inference_mode()
def text_embeddings(blip: Blip2, texts: list[str]) -> torch.Tensor:
    """L2-normalised text features `[n, E]` (float32, on CPU): the Q-Former's [CLS] output, projected."""
    feats = []
    for chunk in chunks(len(texts), blip.batch_size):
        ids, mask = _tokenize(blip, [texts[r] for r in chunk])
        feats.append(blip.model.text_features(ids, mask).float().cpu())
    return torch.cat(feats)


def similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """`[n_images, Q, E]` x `[n_texts, E]` -> `[n_images, n_texts]`: per pair, the largest cosine over the queries."""
    return torch.einsum("iqe,te->iqt", image_feats, text_feats).amax(dim=1)
