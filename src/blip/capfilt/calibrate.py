"""Choosing the filter's threshold on held-out data instead of fixing it at 0.5.

The filter keeps a text when its ITM P(match) is at least the threshold. A small model's scores are not calibrated
probabilities, so 0.5 can remove most true captions (or keep most false ones). Given the filter's scores on a
validation set of true captions and of texts known to be false for their images (written negatives, other images'
captions), `choose_threshold` picks the cut with the best balanced accuracy - the mean of the share of true texts kept
and the share of false texts removed - which does not depend on how many of each the validation set holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blip.api import Blip

__all__ = ["choose_threshold", "score_validation"]


def choose_threshold(positive: Sequence[float], negative: Sequence[float]) -> dict[str, float]:
    """The threshold (keep: score >= threshold) that maximises balanced accuracy on these scores; midway between the
    two scores it separates. Returns `{"threshold", "kept_true", "removed_false", "balanced_accuracy"}`."""
    if not positive or not negative:
        raise ValueError("choosing a threshold needs scores of true and of false texts")
    pos, neg = sorted(positive), sorted(negative)
    cuts = sorted(set(pos) | set(neg))
    candidates = [cuts[0]] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:])] + [cuts[-1] + 1e-6]
    best: dict[str, float] = {}
    i = j = 0  # pos[:i] and neg[:j] are below the cut
    for cut in candidates:
        while i < len(pos) and pos[i] < cut:
            i += 1
        while j < len(neg) and neg[j] < cut:
            j += 1
        kept_true, removed_false = 1 - i / len(pos), j / len(neg)
        score = (kept_true + removed_false) / 2
        if not best or score > best["balanced_accuracy"]:
            best = {
                "threshold": cut,
                "kept_true": kept_true,
                "removed_false": removed_false,
                "balanced_accuracy": score,
            }
    return best


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
