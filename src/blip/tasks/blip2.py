"""BLIP-2 captioning and visual question answering, on the one decoding loop of `blip.models.generation`.

Each distinct image goes through the ViT and the Q-Former once; its projected query outputs become the language
model's soft prefix where transformers' `Blip2ForConditionalGeneration.generate` puts them:

- OPT (decoder-only): the input ids are `num_query_tokens` `<image>` placeholders, BOS and the prompt's tokens
  (Blip2Processor's layout; no prompt: the empty one, i.e. BOS alone), the placeholders' embeddings replaced by the
  query outputs. transformers returns those ids followed by the new tokens, and its repetition penalty sees them all.
- T5 (encoder-decoder): the encoder reads [query outputs; the prompt's tokens + EOS] (no prompt: the empty prompt,
  [query outputs; EOS]); the decoder starts from `decoder_start_token_id` and transformers returns its ids.

Sources (an image with a prompt, or a question about an image) with prompts of different lengths decode together:
OPT prefixes are left-padded with an attention mask, T5 encoder inputs right-padded with a mask; each result is what
transformers gives for that source alone. Stop ids, pad and decoder start come from the language model's config, as
transformers' `generate` takes them (it builds the language model's generation settings from `text_config`; a
checkpoint's top-level generation_config.json does not reach `language_model.generate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from blip.models.generation import EncoderDecoderStepper, GenerationConfig, generate
from blip.models.generation import Sequence as Generated
from blip.models.static_decode import causal_lm_stepper
from blip.tasks.blip2_itm import encode_images
from blip.tasks.common import Answer, Caption, chunks
from blip.tasks.options import OptionError

if TYPE_CHECKING:
    from blip.api import Blip2

DEFAULT_PROMPT_TEMPLATE = "Question: {} Answer:"


# --- prompts and limits -----------------------------------------------------------------------------------------------


def prompt_ids(blip: Blip2, prompt: str | None) -> list[int]:
    """A prompt's language-model ids as Blip2Processor makes them (OPT: BOS first; T5: EOS last); None = ""."""
    return blip.tokenizer.encode(prompt or "")


def question_prompt(template: str | None, question: str, blip: Blip2) -> str:
    """The question put in the template (None: the checkpoint's, "Question: {} Answer:")."""
    template = template if template is not None else blip.prompt_template or DEFAULT_PROMPT_TEMPLATE
    return template.replace("{}", question, 1)


def _positions(blip: Blip2) -> int | None:
    """Positions an OPT prefix + new tokens may fill (query tokens included); None for T5 (relative positions)."""
    if blip.config.kind != "opt":
        return None
    return int(blip.config.text.max_position_embeddings)


def _check_length(blip: Blip2, prompt_len: int, max_new_tokens: int, field: str, what: str) -> None:
    """OptionError naming `field` (or max_new_tokens when the prompt alone fits) when an OPT prefix (query tokens +
    prompt) and the new tokens do not fit the language model's positions."""
    positions = _positions(blip)
    queries = blip.config.num_query_tokens
    if positions is None or queries + prompt_len + max_new_tokens <= positions:
        return
    if queries + prompt_len < positions:
        field = "max_new_tokens"
    raise OptionError(
        field,
        f"{what} ({prompt_len} tokens after the {queries} query tokens) + max_new_tokens ({max_new_tokens}) is over "
        f"the language model's {positions} positions",
    )


def check_caption_lengths(blip: Blip2, prompt: str | None, max_new_tokens: int) -> None:
    """OptionError when the prompt and the new tokens do not fit the OPT positions (T5 has no such limit)."""
    if _positions(blip) is not None:
        _check_length(blip, len(prompt_ids(blip, prompt)), max_new_tokens, "prompt", "the prompt")


def check_vqa_lengths(blip: Blip2, template: str | None, max_new_tokens: int) -> None:
    """The template alone must leave room for the new tokens (each formatted question is checked when answering)."""
    if _positions(blip) is not None:
        empty = question_prompt(template, "", blip)
        _check_length(blip, len(prompt_ids(blip, empty)), max_new_tokens, "prompt_template", "the prompt template")


def check_question_length(blip: Blip2, template: str | None, question: str, max_new_tokens: int, field: str) -> None:
    """OptionError naming `field` when the question in its prompt template and the new tokens do not fit the OPT
    positions (T5 has no such limit)."""
    if _positions(blip) is not None:
        ids = prompt_ids(blip, question_prompt(template, question, blip))
        _check_length(blip, len(ids), max_new_tokens, field, "the question in its prompt")


# --- images to soft prefixes ------------------------------------------------------------------------------------------


@torch.inference_mode()
def image_queries(blip: Blip2, images: list[Image.Image]) -> torch.Tensor:
    """The language model's soft prefix of each image, `[n, Q, D_lm]` in the LM's dtype (ViT + Q-Former once)."""
    model = blip.model
    return encode_images(blip, images, lambda embeds: model.language_inputs(model.query_output(embeds)))


def _image_token_id(blip: Blip2) -> int:
    token = blip.config.image_token_index
    if token is None:
        token = getattr(blip.tokenizer, "image_token_id", None)
    if token is None:
        raise ValueError("this BLIP-2 checkpoint names no image token (config.json image_token_index)")
    return int(token)


@torch.inference_mode()
def generate_from(
    blip: Blip2,
    queries: torch.Tensor,
    prompts: Sequence[list[int]],
    generation: GenerationConfig,
    generators: Sequence[torch.Generator] | None = None,
    images: Sequence[int] | None = None,
) -> list[list[Generated]]:
    """Decode each source: soft prefix `queries[s]` `[Q, D]` then the LM ids `prompts[s]`. Returned sequences hold
    (OPT) the source's input ids (placeholders, BOS, prompt) + generated ids, or (T5) decoder start + generated ids.

    `images[s]` (optional): which image source `s` is about; sources about the same image (so with the same
    `queries` row) share work: for OPT the keys/values of their common prefix (query outputs, BOS, the template's
    common start) are computed once; for T5 sources with the same image and prompt run the encoder once."""
    lm, text = blip.model.language_model, blip.config.text
    num_sources, num_queries = queries.shape[0], queries.shape[1]
    device = queries.device
    if blip.config.kind == "opt":
        image_id = _image_token_id(blip)
        prefix_ids = [[image_id] * num_queries + list(ids) for ids in prompts]
        longest = max(len(ids) for ids in prefix_ids)
        pad = text.pad_token_id if text.pad_token_id is not None else 0
        ids = torch.full((num_sources, longest), pad, dtype=torch.long)
        mask = torch.zeros(num_sources, longest, dtype=torch.long)
        for s, row in enumerate(prefix_ids):  # left padding
            ids[s, longest - len(row) :] = torch.tensor(row)
            mask[s, longest - len(row) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        embeds = lm.embed_tokens(ids)
        starts = (longest - torch.tensor([len(row) for row in prefix_ids])).tolist()
        for s, start in enumerate(starts):  # the placeholders' embeddings replaced by the query outputs
            embeds[s, start : start + num_queries] = queries[s].to(embeds.dtype)
        stepper = causal_lm_stepper(lm, embeds, mask, prefix_ids, images, generation.decode)
    else:
        # Sources with the same image and prompt read the same encoder states: encode each distinct pair once.
        keys = [(s if images is None else images[s], tuple(ids)) for s, ids in enumerate(prompts)]
        distinct = list(dict.fromkeys(keys))
        first = {key: s for s, key in reversed(list(enumerate(keys)))}
        unique = [first[key] for key in distinct]
        longest = max(len(prompts[s]) for s in unique)
        pad = text.pad_token_id if text.pad_token_id is not None else 0
        ids = torch.full((len(unique), longest), pad, dtype=torch.long)
        mask = torch.ones(len(unique), num_queries + longest, dtype=torch.long)
        for i, s in enumerate(unique):  # right padding
            row = prompts[s]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, num_queries + len(row) :] = 0
        ids, mask = ids.to(device), mask.to(device)
        prompt_embeds = lm.embed_tokens(ids)
        pick = torch.tensor(unique, device=device)
        embeds = torch.cat([queries.index_select(0, pick).to(prompt_embeds.dtype), prompt_embeds], dim=1)
        states = lm.encode(embeds, mask)  # (U, Q + L, D)
        cross = lm.cross_kv(states, mask)
        if len(unique) < num_sources:
            position = {key: i for i, key in enumerate(distinct)}
            cross = cross.select(torch.tensor([position[key] for key in keys], device=device))
        stepper = EncoderDecoderStepper(lm, cross, text.decoder_start_token_id, num_sources)
    return generate(stepper, generation, eos_id=text.eos_token_id, generators=generators)


def _text(blip: Blip2, ids: list[int]) -> str:
    return blip.tokenizer.decode(ids, skip_special_tokens=True).strip()


# --- the tasks --------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def caption_images(
    blip: Blip2,
    images: list[Image.Image],
    *,
    prompt: str | None,
    generation: GenerationConfig,
    generators: Sequence[torch.Generator] | None = None,
) -> list[list[Caption]]:
    """`num_return_sequences` captions per image. `token_ids`: OPT -> BOS, prompt, generated ids; T5 -> decoder
    start, generated ids (what transformers returns, without the image placeholders); `text` their decode, stripped."""
    if generators is not None and len(generators) != len(images):
        raise ValueError(f"{len(generators)} generators for {len(images)} images")
    ids = prompt_ids(blip, prompt)
    skip = blip.config.num_query_tokens if blip.config.kind == "opt" else 0
    results: list[list[Caption]] = []
    for chunk in chunks(len(images), blip.batch_size):
        queries = image_queries(blip, [images[i] for i in chunk])
        mine = [generators[i] for i in chunk] if generators is not None else None
        for sequences in generate_from(blip, queries, [ids] * len(chunk), generation, mine):
            results.append([Caption(_text(blip, s.token_ids[skip:]), s.score, s.token_ids[skip:]) for s in sequences])
    return results


@torch.inference_mode()
def answer_questions(
    blip: Blip2,
    images: list[Image.Image],
    questions: list[str],
    image_index: list[int],
    *,
    generation: GenerationConfig,
    prompt_template: str | None,
) -> list[Answer]:
    """One answer per question (`image_index[q]`: which of `images` it is about; each image is encoded once).
    `token_ids`: OPT -> the generated ids alone; T5 -> decoder start + generated ids; `text` their decode, stripped."""
    candidates = answer_candidates(
        blip, images, questions, image_index, generation=generation, prompt_template=prompt_template
    )
    return [best for best, *_ in candidates]


@torch.inference_mode()
def answer_candidates(
    blip: Blip2,
    images: list[Image.Image],
    questions: list[str],
    image_index: list[int],
    *,
    generation: GenerationConfig,
    prompt_template: str | None,
) -> list[list[Answer]]:
    """`generation.num_return_sequences` answers per question, best first (beam search: the best beams); the first
    is `answer_questions`' answer with the same settings."""
    prompts = [prompt_ids(blip, question_prompt(prompt_template, q, blip)) for q in questions]
    for q, ids in enumerate(prompts):
        _check_length(blip, len(ids), generation.max_new_tokens, "questions", f"question {q} in its prompt")
    queries = image_queries(blip, images)
    results: list[list[Answer]] = []
    for chunk in chunks(len(questions), blip.batch_size):
        rows = list(chunk)
        images_of = [image_index[r] for r in rows]
        index = torch.tensor(images_of, device=queries.device)
        sources = generate_from(
            blip, queries.index_select(0, index), [prompts[r] for r in rows], generation, images=images_of
        )
        for r, sequences in zip(rows, sources):
            skip = blip.config.num_query_tokens + len(prompts[r]) if blip.config.kind == "opt" else 0
            results.append([Answer(_text(blip, s.token_ids[skip:]), s.score, s.token_ids[skip:]) for s in sequences])
    return results
