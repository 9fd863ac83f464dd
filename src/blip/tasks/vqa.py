"""Visual question answering: generate an answer, or rank a given answer list (the original evaluation mode)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from blip.models.bert import CrossKV
from blip.models.generation import GenerationConfig, generate
from blip.models.static_decode import text_decoder_stepper
from blip.tasks.common import MAX_TEXT_TOKENS, Answer, chunks, group_rows, image_input

if TYPE_CHECKING:
    from blip.api import Blip

RANK_TOP_K = 128  # candidates kept after the first-token pass (original VQA evaluation)
RANK_LABEL_SMOOTHING = 0.1


@torch.inference_mode()
def encode_questions(
    blip: Blip, images: list[Image.Image], questions: list[str], image_index: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Question states `[Q, L, D]` and mask `[Q, L]`, each question grounded in its image; the ViT runs once per
    distinct image and each image's cross-attention keys/values are projected once."""
    model = blip.model
    order, per_image = group_rows(image_index, len(images))
    ids, mask = blip.tokenizer([questions[r] for r in order], max_length=MAX_TEXT_TOKENS)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    image_embeds = model.encode_image(image_input(blip, images, model))
    index = None if per_image else torch.tensor([image_index[r] for r in order], device=device)
    cross = model.image_cross_kv(image_embeds, index=index)
    states = model.encode_multimodal(ids, mask, cross=cross)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    inverse = inverse.to(device)
    return states.index_select(0, inverse), mask.index_select(0, inverse)


def _answer_cross(blip: Blip, states: torch.Tensor, mask: torch.Tensor) -> CrossKV:
    return blip.model.text_decoder.bert.cross_kv(states, mask)


@torch.inference_mode()
def answer_questions(
    blip: Blip,
    images: list[Image.Image],
    questions: list[str],
    image_index: list[int],
    *,
    generation: GenerationConfig,
    answers: Sequence[str] | None,
) -> list[Answer]:
    """One answer per question; `image_index[q]` says which of `images` question q is about."""
    results: list[Answer] = []
    ranked = None if answers is None else answer_ids(blip, answers)  # tokenized once, not per chunk
    for states, mask in _chunk_states(blip, images, questions, image_index):
        results.extend(answers_from_states(blip, states, mask, generation=generation, answers=answers, ranked=ranked))
    return results


def _chunk_states(
    blip: Blip, images: list[Image.Image], questions: list[str], image_index: list[int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`encode_questions` per chunk of `blip.batch_size` questions; a chunk encodes only the images it asks about."""
    for chunk in chunks(len(questions), blip.batch_size):
        rows = list(chunk)
        used = sorted({image_index[r] for r in rows})
        local = {img: i for i, img in enumerate(used)}
        yield encode_questions(
            blip, [images[i] for i in used], [questions[r] for r in rows], [local[image_index[r]] for r in rows]
        )


def _generated(
    blip: Blip, states: torch.Tensor, mask: torch.Tensor, generation: GenerationConfig
) -> list[list[Answer]]:
    """`generation.num_return_sequences` generated answers per row of the question states, best first."""
    bos, eos = blip.config.text.bos_token_id, blip.config.text.sep_token_id
    cross = _answer_cross(blip, states, mask)
    stepper = text_decoder_stepper(blip.model.text_decoder, cross, [bos], generation.decode)
    return [
        [Answer(blip.tokenizer.decode(s.token_ids), s.score, s.token_ids) for s in sequences]
        for sequences in generate(stepper, generation, eos_id=eos)
    ]


@torch.inference_mode()
def answers_from_states(
    blip: Blip,
    states: torch.Tensor,
    mask: torch.Tensor,
    *,
    generation: GenerationConfig,
    answers: Sequence[str] | None,
    ranked: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[Answer]:
    """An answer per row of the grounded question states `[Q, L, D]` (mask `[Q, L]`): generated, or the best of
    `answers` (`ranked`: those answers from `answer_ids`, when the caller tokenized them once already)."""
    if answers is None:
        return [answer for (answer,) in _generated(blip, states, mask, generation)]
    cross = _answer_cross(blip, states, mask)
    return _rank(blip, cross, answers, *(ranked if ranked is not None else answer_ids(blip, answers)))


@torch.inference_mode()
def answer_candidates(
    blip: Blip,
    images: list[Image.Image],
    questions: list[str],
    image_index: list[int],
    *,
    generation: GenerationConfig,
) -> list[list[Answer]]:
    """`generation.num_return_sequences` generated answers per question, best first (beam search: the best beams,
    scored as beam search ranks them); the first is `answer_questions`' answer with the same settings."""
    results: list[list[Answer]] = []
    for states, mask in _chunk_states(blip, images, questions, image_index):
        results.extend(_generated(blip, states, mask, generation))
    return results


def answer_ids(blip: Blip, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The answers as decoder inputs: `[BOS] ... [SEP]` ids and mask, on the model's device."""
    ids, mask = blip.tokenizer(answers)
    ids[:, 0] = blip.config.text.bos_token_id
    return ids.to(blip.device), mask.to(blip.device)


def _rank(blip: Blip, cross: CrossKV, answers: Sequence[str], ids: torch.Tensor, mask: torch.Tensor) -> list[Answer]:
    """Original rank mode: keep the top-k answers by first-token probability, then re-score those k by teacher
    forcing; score = -(sum of label-smoothed token cross-entropies), as the official VQA numbers were made.
    `ids`, `mask`: the answers from `answer_ids`."""
    decoder = blip.model.text_decoder
    device = cross.keys[0].device
    num_questions = cross.keys[0].shape[0]
    start = torch.full((num_questions, 1), blip.config.text.bos_token_id, device=device)
    first = decoder(start, cross=cross, last_only=True).float().softmax(-1)  # (Q, V)
    k = min(RANK_TOP_K, len(answers))
    top_probs, top = first[:, ids[:, 1]].topk(k, dim=1)  # (Q, k)

    cand_ids, cand_mask = ids[top.reshape(-1)], mask[top.reshape(-1)]  # (Q*k, La), grouped k rows per question
    logits = decoder(cand_ids, cand_mask, cross=cross).float()
    targets = cand_ids[:, 1:].masked_fill(cand_mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, reduction="none", label_smoothing=RANK_LABEL_SMOOTHING
    ).sum(1)
    scores = (-loss).view(num_questions, k)
    best = scores.argmax(1)
    out = []
    for q in range(num_questions):
        j = int(top[q, best[q]])
        token_ids = ids[j][mask[j].bool()].tolist()
        out.append(Answer(answers[j], float(scores[q, best[q]]), token_ids))
    return out
