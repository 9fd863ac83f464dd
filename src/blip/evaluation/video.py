"""Zero-shot text-to-video retrieval (the paper's Table 10 protocol, docs/preprocessing.md#video) on any clip
manifest: each clip's ITC feature is the normalised mean of its sampled frames' features (`Blip.embed_videos`), and
each caption queries every clip; the top `k_test` clips of each caption are re-scored with ``ITM logit + ITC
similarity`` over the clip's concatenated frame tokens, everything else -100 (as the original re-scores images).

Ranks: the position of the caption's clip in a stable descending sort (ties to the smaller index); a caption shared
by several clips counts as found at the best of their ranks. Chance R@K is K / clips (a random order).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blip.evaluation.run import EvalResult
from blip.tasks.common import MAX_TEXT_TOKENS
from blip.video import read_frames

if TYPE_CHECKING:
    from blip.api import Blip

KS = (1, 5, 10)


def read_clips(manifest: str | Path) -> list[dict[str, Any]]:
    """`{"id", "video" (absolute), "caption"}` per line of a clip manifest (`blip.data.shapes.video`'s, or any JSONL
    with a video path, relative to the manifest, and a caption)."""
    path = Path(manifest)
    if path.is_dir():
        path = path / "videos.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{manifest}: no clip manifest (a videos.jsonl with video and caption columns)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record.get("video"), str) or not isinstance(record.get("caption"), str):
            raise ValueError(f"{path} line {n}: needs a video path and a caption")
        video = Path(record["video"])
        rows.append(
            {
                "id": str(record.get("id", record["video"])),
                "video": str(video if video.is_absolute() else path.parent / video),
                "caption": record["caption"],
            }
        )
    if not rows:
        raise ValueError(f"{path}: no clips")
    return rows


def _ranks(scores: torch.Tensor, truth: list[list[int]]) -> torch.Tensor:
    """Per query row: the best rank (0 = first) among its true columns, ties going to the smaller column."""
    cols = torch.arange(scores.shape[1])
    out = []
    for r, targets in enumerate(truth):
        row = scores[r]
        best = min(int((row > row[t]).sum() + ((row == row[t]) & (cols < t)).sum()) for t in targets)
        out.append(best)
    return torch.tensor(out)


def _recalls(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    metrics = {f"{prefix}r{k}": 100.0 * float((ranks < k).double().mean()) for k in KS}
    metrics[f"{prefix}medr"] = float(ranks.float().median() + 1)
    return metrics


@torch.inference_mode()
def evaluate_video_retrieval(
    blip: Blip, rows: list[dict[str, Any]], *, num_frames: int = 8, k_test: int = 16
) -> EvalResult:
    """Text -> video R@1/5/10 and median rank (ITM re-scored; ``itc_*``: by ITC alone), with chance levels."""
    from blip.tasks.video import frame_tokens, video_feature

    model = blip.model
    device = next(model.parameters()).device
    size = blip.transform.image_size
    tokens = [frame_tokens(blip, read_frames(r["video"], num_frames, size=size, name=r["id"])) for r in rows]
    video_feats = torch.stack([video_feature(blip, t) for t in tokens])  # the ViT runs once per clip: ITC and ITM
    captions = list(dict.fromkeys(r["caption"] for r in rows))
    truth = [[i for i, r in enumerate(rows) if r["caption"] == c] for c in captions]
    text_feats = blip.embed_texts(captions)
    sims = text_feats @ video_feats.T  # [captions, clips]

    k = min(k_test, len(rows))
    top = sims.topk(k, dim=1).indices
    rescored = torch.full_like(sims, -100.0)
    ids, mask = blip.tokenizer(captions, max_length=MAX_TEXT_TOKENS)
    queries_of: dict[int, list[int]] = {}  # clip -> the captions whose top k hold it, in caption order
    for q, clips in enumerate(top.tolist()):
        for v in clips:
            queries_of.setdefault(v, []).append(q)
    for v, queries in sorted(queries_of.items()):
        cross = model.image_cross_kv(tokens[v].reshape(1, -1, tokens[v].shape[-1]))  # all frames' tokens, in order
        states = model.encode_multimodal(
            ids[queries].to(device), mask[queries].to(device), cross=cross, first_only=True
        )
        itm = model.itm_logits(states)[:, 1].float().cpu()
        rescored[queries, v] = itm + sims[queries, v]
    ranks, itc_ranks = _ranks(rescored, truth), _ranks(sims, truth)
    metrics = {**_recalls(ranks, "t2v_"), **_recalls(itc_ranks, "itc_t2v_")}
    metrics.update({f"chance_r{k}": 100.0 * min(1.0, k / len(rows)) for k in KS})
    metrics.update(clips=float(len(rows)), captions=float(len(captions)), num_frames=float(num_frames))
    best = rescored.argmax(1).tolist()
    predictions = [
        {"caption": c, "best_clip": rows[best[q]]["id"], "correct": best[q] in truth[q], "rank": int(ranks[q]) + 1}
        for q, c in enumerate(captions)
    ]
    return EvalResult("video_retrieval", metrics, predictions)
