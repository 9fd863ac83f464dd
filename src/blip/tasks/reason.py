"""Visual reasoning (NLVR2): is a statement about a pair of images true? (`Blip.reason`, `blip reason`,
`POST /v1/reason`, `blip batch reason`.)

Score (docs/outputs.md): P(true) = softmax(cls_head(h))[1], h = the twin cross-attention encoder's output at
position 0, where `[ENC]` replaces `[CLS]` (as the original trains it); image a feeds the `self0`/`dense0` branch
("the left image" of NLVR2), image b `self1`/`dense1`. Each distinct image of a call goes through the ViT once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from blip.tasks.common import Verdict, chunks, image_input

if TYPE_CHECKING:
    from blip.api import Blip

MAX_STATEMENT_TOKENS = 64  # the original keeps 40 words (pre_caption) and pads to the longest; 64 tokens holds them


@torch.inference_mode()
def reason_pairs(
    blip: Blip, images: list[Image.Image], statements: list[str], index_a: list[int], index_b: list[int]
) -> list[Verdict]:
    """A `Verdict` for each statement s about (images[index_a[s]], images[index_b[s]])."""
    model = blip.model
    device = next(model.parameters()).device
    max_length = min(MAX_STATEMENT_TOKENS, model.config.text.max_position_embeddings)
    out: list[Verdict] = []
    for chunk in chunks(len(statements), blip.batch_size):
        rows = list(chunk)
        used = sorted({index_a[r] for r in rows} | {index_b[r] for r in rows})
        local = {img: i for i, img in enumerate(used)}
        image_embeds = model.encode_image(image_input(blip, [images[i] for i in used], model))  # (U, N, D)
        a = torch.tensor([local[index_a[r]] for r in rows], device=device)
        b = torch.tensor([local[index_b[r]] for r in rows], device=device)
        ids, mask = blip.tokenizer([statements[r] for r in rows], max_length=max_length)
        ids[:, 0] = model.config.enc_token_id
        logits = model.reason_logits(ids.to(device), mask.to(device), image_embeds[a], image_embeds[b])
        probs = logits.float().softmax(-1)[:, 1].tolist()
        out += [Verdict(label=p >= 0.5, score=p) for p in probs]
    return out
