"""Zero-shot video (docs/preprocessing.md#video): an image model over sampled frames, with no temporal modelling.

- ITC: a video's feature is ``normalise(mean over its frames of vision_proj(frame [CLS]))`` (the per-frame projections
  are averaged before the one L2 normalisation, as the original evaluation does);
- ITM and VQA: the tokens of all N frames are concatenated into one cross-attention memory ``[1, N * (1 + P), D]``
  that the text attends to, exactly as it attends to one image's tokens.

Videos arrive here decoded: a list of RGB frames each (`blip.video.read_frames`). `blip.api.Blip.embed_videos`,
`match_video` and `answer_video` decode and call these; so do video collection indexes (`blip.tasks.retrieval`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from blip.models.generation import GenerationConfig
from blip.tasks.common import MAX_TEXT_TOKENS, Answer, check_texts, chunks, image_input
from blip.tasks.vqa import answer_ids, answers_from_states

if TYPE_CHECKING:
    from blip.api import Blip

Frames = Sequence[Image.Image]
BLIP2_REFUSAL = (
    "video tasks (embed_videos, match_video, answer_video, video indexes) are for BLIP checkpoints: BLIP-2 has no "
    "defined way to pool its per-frame query features; use a BLIP retrieval or VQA checkpoint"
)


MAX_VIDEO_FRAMES = 256  # frames per video in one call: each adds 1 + P tokens to the cross-attention memory


def check_video_model(blip: object) -> None:
    """BLIP-2 models are refused for video tasks (`BLIP2_REFUSAL`)."""
    from blip.tasks.options import is_blip2

    if is_blip2(blip):
        raise ValueError(BLIP2_REFUSAL)


def check_num_frames(num_frames: object) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_VIDEO_FRAMES:
        raise ValueError(f"num_frames must be an integer between 1 and {MAX_VIDEO_FRAMES}, got {num_frames!r}")


def video_label(video: object, i: int, n: int) -> str:
    """A video's name in error messages: its path, else its position."""
    if isinstance(video, str | os.PathLike):
        return str(video)
    return f"video {i}" if n > 1 else "video"


def text_list(texts: object, what: str) -> list[str]:
    """A string or a non-empty list of non-empty strings, as a list."""
    items = [texts] if isinstance(texts, str) else list(texts) if isinstance(texts, list | tuple) else None
    if not items:
        raise ValueError(f"{what}s must be a string or a non-empty list of strings")
    check_texts(items, what)
    return items


def frame_tokens(blip: Blip, frames: Frames) -> torch.Tensor:
    """The ViT's tokens of each frame, `[N, 1 + P, D]`, `blip.batch_size` frames per pass."""
    model = blip.model
    parts = [
        model.encode_image(image_input(blip, [frames[i] for i in c], model))
        for c in chunks(len(frames), blip.batch_size)
    ]
    return torch.cat(parts)


def concatenated_tokens(blip: Blip, frames: Frames) -> torch.Tensor:
    """All frames' tokens as one memory, `[1, N * (1 + P), D]` (frame 0's tokens first)."""
    tokens = frame_tokens(blip, frames)
    return tokens.reshape(1, -1, tokens.shape[-1])


@torch.inference_mode()
def video_embeddings(blip: Blip, videos: Sequence[Frames]) -> torch.Tensor:
    """L2-normalised ITC video features `[n, embed_dim]` (float32, on CPU): the normalised mean of the frames'
    projected `[CLS]` features."""
    feats = [video_feature(blip, frame_tokens(blip, frames)) for frames in videos]
    return torch.stack(feats) if feats else torch.empty(0, blip.config.embed_dim)


def video_feature(blip: Blip, tokens: torch.Tensor) -> torch.Tensor:
    """One video's L2-normalised ITC feature `[embed_dim]` (float32, CPU) from its frames' tokens `[N, 1 + P, D]`."""
    projection = blip.model.vision_proj
    if projection is None:
        raise ValueError(f"this {blip.config.kind!r} model has no vision_proj")
    per_frame = projection(tokens[:, 0]).float()  # [N, E], not normalised
    return F.normalize(per_frame.mean(0), dim=-1).cpu()


@torch.inference_mode()
def match_videos(blip: Blip, videos: Sequence[Frames], texts: Sequence[str], video_index: Sequence[int]) -> list[float]:
    """ITM P(match) for each (videos[video_index[t]], texts[t]) pair, the text cross-attending to all the video's
    frame tokens at once; each video is encoded once."""
    model = blip.model
    device = next(model.parameters()).device
    out = [0.0] * len(texts)
    for v in sorted(set(video_index)):
        rows = [t for t, owner in enumerate(video_index) if owner == v]
        cross = model.image_cross_kv(concatenated_tokens(blip, videos[v]))  # one memory; every row reads it
        for chunk in chunks(len(rows), blip.batch_size):
            batch = [rows[i] for i in chunk]
            ids, mask = blip.tokenizer([texts[r] for r in batch], max_length=MAX_TEXT_TOKENS)
            states = model.encode_multimodal(ids.to(device), mask.to(device), cross=cross, first_only=True)
            probs = model.itm_logits(states).float().softmax(-1)[:, 1].tolist()
            for r, p in zip(batch, probs):
                out[r] = p
    return out


@torch.inference_mode()
def answer_video_questions(
    blip: Blip,
    frames: Frames,
    questions: Sequence[str],
    *,
    generation: GenerationConfig,
    answers: Sequence[str] | None,
) -> list[Answer]:
    """An answer per question about one video: each question is encoded over the concatenated frame tokens, then the
    answer decoder generates (or ranks `answers`) as for an image."""
    model = blip.model
    device = next(model.parameters()).device
    cross = model.image_cross_kv(concatenated_tokens(blip, frames))
    results: list[Answer] = []
    ranked = None if answers is None else answer_ids(blip, answers)  # tokenized once, not per chunk
    for chunk in chunks(len(questions), blip.batch_size):
        ids, mask = blip.tokenizer([questions[i] for i in chunk], max_length=MAX_TEXT_TOKENS)
        ids, mask = ids.to(device), mask.to(device)
        states = model.encode_multimodal(ids, mask, cross=cross)
        results.extend(answers_from_states(blip, states, mask, generation=generation, answers=answers, ranked=ranked))
    return results
