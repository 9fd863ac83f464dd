"""Choosing the filter's threshold on held-out data instead of fixing it at 0.5.

The filter keeps a text when its ITM P(match) is at least the threshold. A small model's scores are not calibrated
probabilities, so 0.5 can remove most true captions (or keep most false ones). Given the filter's scores on a
validation set of true captions and of texts known to be false for their images (written negatives, other images'
captions), `choose_threshold` picks the cut with the best balanced accuracy - the mean of the share of true texts kept
and the share of false texts removed - which does not depend on how many of each the validation set holds; or, with
`keep_true`, the strictest cut that still keeps that share of the true texts (the good data a user accepts to lose:
balanced accuracy's optimum is often flat, and where it lands on it moves from one validation draw to the next).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blip.api import Blip

__all__ = ["choose_threshold", "score_validation"]


def choose_threshold(
    positive: Sequence[float], negative: Sequence[float], keep_true: float | None = None
) -> dict[str, float]:
    """The threshold (keep: score >= threshold) that maximises balanced accuracy on these scores, or with `keep_true`
    (in (0, 1]) the highest one that keeps at least that share of the true texts; midway between the two scores it
    separates. Returns `{"threshold", "kept_true", "removed_false", "balanced_accuracy"}`."""
    if not positive or not negative:
        raise ValueError("choosing a threshold needs scores of true and of false texts")
    if keep_true is not None and not 0 < keep_true <= 1:
        raise ValueError(f"keep_true must be in (0, 1], got {keep_true}")
    pos, neg = sorted(positive), sorted(negative)

    def at(cut: float) -> dict[str, float]:
        kept_true = sum(p >= cut for p in pos) / len(pos)
        removed_false = sum(n < cut for n in neg) / len(neg)
        return {
            "threshold": cut,
            "kept_true": kept_true,
            "removed_false": removed_false,
            "balanced_accuracy": (kept_true + removed_false) / 2,
        }

    if keep_true is not None:
        removable = math.floor(round((1 - keep_true) * len(pos), 9))  # true texts the cut may fall below
        return at(pos[0] if removable == 0 else (pos[removable - 1] + pos[removable]) / 2)
    cuts = sorted(set(pos) | set(neg))
    candidates = [cuts[0]] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:])] + [cuts[-1] + 1e-6]
    best_cut, best_score = candidates[0], -1.0
    i = j = 0  # pos[:i] and neg[:j] are below the cut
    for cut in candidates:
        while i < len(pos) and pos[i] < cut:
            i += 1
        while j < len(neg) and neg[j] < cut:
            j += 1
        score = (1 - i / len(pos) + j / len(neg)) / 2
        if score > best_score:
            best_cut, best_score = cut, score
    return at(best_cut)


def score_validation(filter: Blip, rows: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """The filter's P(match) for every `captions` text (true) and every `negatives` text (false) of `rows`
    (`{"image": path, "captions": [...], "negatives": [...]}`), each image encoded once."""
    positive: list[float] = []
    negative: list[float] = []
    for row in rows:
        texts = list(row["captions"]) + list(row.get("negatives", ()))
        scores = filter.match([row["image"]] * len(texts), texts)
        positive += scores[: len(row["captions"])]
        negative += scores[len(row["captions"]) :]
    return positive, negative
