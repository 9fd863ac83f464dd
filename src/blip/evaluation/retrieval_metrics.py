"""Image-text retrieval Recall@K as the BLIP paper reports it (COCO 5k / Flickr30K 1k test).

* Text retrieval (i2t, ``tr_r*``): the percentage of images for which *any* of their ground-truth captions ranks in
  the top K of the image's row of scores.
* Image retrieval (t2i, ``ir_r*``): the percentage of captions whose image ranks in the top K of the caption's row.

Ranks are computed without sorting: an item's rank is the number of items that score higher, plus the number of
earlier-indexed items with an equal score (i.e. the position in a stable descending sort; BLIP's
``np.argsort(score)[::-1]`` leaves the order of ties unspecified). NaN scores never rank ahead of anything; a NaN
score for a ground-truth pair is an error. Work is done in chunks of rows with torch, on the device of the input, so a
10k x 50k matrix needs only tens of MB on top of the matrix itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["recall_at_k", "retrieval_ranks"]

_CHUNK_ELEMENTS = 1 << 24  # elements of the score matrix handled per step (~16M: 16 MB of booleans)


def _as_tensor(scores: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = scores.detach() if isinstance(scores, torch.Tensor) else torch.from_numpy(np.asarray(scores))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
    return t


def _check_targets(n_equal: torch.Tensor) -> None:
    if bool((n_equal == 0).any()):  # a NaN target equals nothing, not even itself
        raise ValueError("a ground-truth pair has a NaN score")


def _row_ranks(scores: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Rank of column ``gt[r]`` within each row ``r`` of ``scores`` (0 = best), ties broken by column index."""
    n_rows, n_cols = scores.shape
    ranks = torch.empty(n_rows, dtype=torch.long, device=scores.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        block = scores[start : start + step]
        g = gt[start : start + step]
        target = block.gather(1, g[:, None])  # (b, 1)
        rank = torch.sum(block > target, 1, dtype=torch.int32).long()
        n_equal = torch.sum(block == target, 1, dtype=torch.int32)  # includes the target itself
        _check_targets(n_equal)
        tied = torch.nonzero(n_equal > 1).squeeze(1)
        if tied.numel():  # rare: also count equal scores at smaller column indices
            cols = torch.arange(n_cols, device=scores.device)
            rank[tied] += ((block[tied] == target[tied]) & (cols[None, :] < g[tied, None])).sum(1)
        ranks[start : start + step] = rank
    return ranks


def _col_ranks(scores: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Rank of row ``gt[c]`` within each column ``c`` of ``scores``; reads contiguous row blocks only."""
    n_rows, n_cols = scores.shape
    cols = torch.arange(n_cols, device=scores.device)
    target = scores[gt, cols][None, :]  # (1, n_cols)
    rank = torch.zeros(n_cols, dtype=torch.long, device=scores.device)
    n_equal = torch.zeros(n_cols, dtype=torch.long, device=scores.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        block = scores[start : start + step]
        rank += torch.sum(block > target, 0, dtype=torch.int32)
        n_equal += torch.sum(block == target, 0, dtype=torch.int32)
    _check_targets(n_equal)
    tied = torch.nonzero(n_equal > 1).squeeze(1)
    if tied.numel():  # rare: also count equal scores at smaller row indices
        rows = torch.arange(n_rows, device=scores.device)
        sub = scores[:, tied]
        rank[tied] += ((sub == target[:, tied]) & (rows[:, None] < gt[tied][None, :])).sum(0)
    return rank


def retrieval_ranks(
    scores_i2t: np.ndarray | torch.Tensor,
    txt2img: Sequence[int],
    img2txts: Sequence[Sequence[int]],
    scores_t2i: np.ndarray | torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best ground-truth rank of every image (i2t) and the ground-truth rank of every caption (t2i), 0-based.

    Args:
        scores_i2t: ``[n_img, n_txt]`` similarity scores (higher = more similar).
        txt2img: The image index of each caption.
        img2txts: The caption indices of each image.
        scores_t2i: Optional ``[n_txt, n_img]`` scores for the t2i direction (BLIP re-ranks each direction
            separately); defaults to ``scores_i2t`` transposed.

    Returns:
        ``(i2t_ranks [n_img], t2i_ranks [n_txt])`` as int64 arrays.
    """
    s = _as_tensor(scores_i2t, "scores_i2t")
    n_img, n_txt = s.shape
    if len(img2txts) != n_img:
        raise ValueError(f"img2txts has {len(img2txts)} entries for {n_img} images")
    if len(txt2img) != n_txt:
        raise ValueError(f"txt2img has {len(txt2img)} entries for {n_txt} captions")
    t2i_img = torch.as_tensor(np.asarray(txt2img, dtype=np.int64), device=s.device)
    if n_txt and (int(t2i_img.min()) < 0 or int(t2i_img.max()) >= n_img):
        raise ValueError(f"txt2img holds an image index outside [0, {n_img})")

    # i2t: the best-ranked ground-truth caption of an image is its highest-scoring one (lowest index on ties).
    counts = np.fromiter((len(t) for t in img2txts), dtype=np.int64, count=n_img)
    if n_img and counts.min() == 0:
        raise ValueError(f"image {int(np.argmin(counts))} has no ground-truth captions")
    flat = np.fromiter((j for t in img2txts for j in t), dtype=np.int64, count=int(counts.sum()))
    if flat.size and (flat.min() < 0 or flat.max() >= n_txt):
        bad = int(np.searchsorted(np.cumsum(counts), np.flatnonzero((flat < 0) | (flat >= n_txt))[0], side="right"))
        raise ValueError(f"image {bad} lists a caption index outside [0, {n_txt})")
    width = int(counts.max()) if n_img else 1
    padded = np.full((n_img, width), n_txt, dtype=np.int64)  # padding sorts last
    rows = np.repeat(np.arange(n_img), counts)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(counts) - counts, counts)  # position within each image's list
    padded[rows, cols] = flat
    padded.sort(axis=1)
    idx = torch.from_numpy(padded).to(s.device)
    valid = idx < n_txt
    gt_scores = torch.zeros(idx.shape, dtype=torch.float64, device=s.device)
    for start in range(0, n_img, 4096):
        rows = s[start : start + 4096].gather(1, idx[start : start + 4096].clamp(max=max(n_txt - 1, 0)))
        gt_scores[start : start + 4096] = rows.to(torch.float64)
    gt_scores[~valid] = -float("inf")
    best = idx.gather(1, torch.argmax(gt_scores, dim=1, keepdim=True)).squeeze(1)  # argmax: first maximum
    i2t = _row_ranks(s, best)

    if scores_t2i is None:
        t2i = _col_ranks(s, t2i_img)  # columns of scores_i2t, without a transposed copy
    else:
        st = _as_tensor(scores_t2i, "scores_t2i").to(s.device)
        if tuple(st.shape) != (n_txt, n_img):
            raise ValueError(f"scores_t2i must have shape {(n_txt, n_img)}, got {tuple(st.shape)}")
        t2i = _row_ranks(st, t2i_img)
    return i2t.cpu().numpy(), t2i.cpu().numpy()


def recall_at_k(
    scores_i2t: np.ndarray | torch.Tensor,
    txt2img: Sequence[int],
    img2txts: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
    scores_t2i: np.ndarray | torch.Tensor | None = None,
) -> dict[str, float]:
    """Text and image retrieval Recall@K in percent, as BLIP's ``itm_eval`` reports them.

    Args:
        scores_i2t: ``[n_img, n_txt]`` similarity scores (numpy or torch, any device).
        txt2img: The image index of each caption.
        img2txts: The caption indices of each image.
        ks: The K values.
        scores_t2i: Optional separate ``[n_txt, n_img]`` scores for image retrieval (default: the transpose).

    Returns:
        ``{"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "tr_mean", "ir_mean", "r_mean"}`` (one ``tr_r{k}``
        and ``ir_r{k}`` per K); the means are over the K values, ``r_mean`` is the mean of the two.
    """
    if len(ks) == 0 or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    i2t, t2i = retrieval_ranks(scores_i2t, txt2img, img2txts, scores_t2i)
    out: dict[str, float] = {}
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * float(np.mean(i2t < k))
    for k in ks:
        out[f"ir_r{k}"] = 100.0 * float(np.mean(t2i < k))
    out["tr_mean"] = sum(out[f"tr_r{k}"] for k in ks) / len(ks)
    out["ir_mean"] = sum(out[f"ir_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    return out
