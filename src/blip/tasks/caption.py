"""Captioning: unconditional or prompted, greedy / beam / nucleus, several captions per image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from blip.models.generation import GenerationConfig, generate
from blip.models.static_decode import text_decoder_stepper
from blip.tasks.common import Caption, chunks, model_input

if TYPE_CHECKING:
    from blip.api import Blip


def prompt_prefix(blip: Blip, prompt: str | None) -> list[int]:
    """Decoder start ids: [DEC], then the prompt's word pieces (tokenized as [CLS] .. [SEP], [CLS] replaced by
    [DEC] and [SEP] dropped, as the captioning checkpoints were trained)."""
    bos = blip.config.text.bos_token_id
    if not prompt:
        return [bos]
    ids = blip.tokenizer.encode(prompt)
    return [bos] + ids[1:-1]


@torch.inference_mode()
def caption_images(
    blip: Blip,
    images: list[Image.Image],
    *,
    prompt: str | None,
    generation: GenerationConfig,
    generators: Sequence[torch.Generator] | None = None,
) -> list[list[Caption]]:
    """`num_return_sequences` captions for each decoded image, in order. `generators` (sampling): one per image, so
    each image's samples depend on its own generator only, not on the other images of the call."""
    if generators is not None and len(generators) != len(images):
        raise ValueError(f"{len(generators)} generators for {len(images)} images")
    decoder = blip.model.text_decoder
    prefix = prompt_prefix(blip, prompt)
    results: list[list[Caption]] = []
    for chunk in chunks(len(images), blip.batch_size):
        pixels = model_input(blip.transform([images[i] for i in chunk]), blip.model)
        image_embeds = blip.model.encode_image(pixels)
        cross = decoder.bert.cross_kv(image_embeds)
        mine = [generators[i] for i in chunk] if generators is not None else None
        eos_id = blip.config.text.sep_token_id
        stepper = text_decoder_stepper(decoder, cross, prefix, generation.decode)
        for sequences in generate(stepper, generation, eos_id=eos_id, generators=mine):
            results.append([Caption(blip.tokenizer.decode(s.token_ids), s.score, s.token_ids) for s in sequences])
    return results
