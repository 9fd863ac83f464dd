"""Choosing the filter's threshold on held-out data instead of fixing it at 0.5.

The filter keeps a text when its ITM P(match) is at least the threshold. A small model's scores are not calibrated
probabilities, so 0.5 can remove most true captions (or keep most false ones). Given the filter's scores on a
validation set of true captions and of texts known to be false for their images (written negatives, other images'
captions), `choose_threshold` picks the cut with the best balanced accuracy - the mean of the share of true texts kept
and the share of false texts removed - which does not depend on how many of each the validation set holds; or, with
`keep_true`, the strictest cut that still keeps that share of the true texts (the good data a user accepts to lose:
balanced accuracy's optimum is often flat, and where it lands on it moves from one validation draw to the next).

The filter's score can also take the ITC head's word (`filter_score`): sigma(logit P(match) + itc_weight x ITC cosine),
as BLIP ranks retrieval candidates by the ITM score plus the ITC similarity. `choose_itc_weight` picks the weight that
best separates the validation set's true and false texts (ROC AUC); 0 is the paper's filter, ITM alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blip.api import Blip

__all__ = ["ValidationScores", "choose_itc_weight", "choose_threshold", "filter_score", "score_validation"]


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


def filter_score(match: float, cosine: float, itc_weight: float) -> float:
    """A text's filter score from its ITM P(match) and ITC cosine: P(match) itself when `itc_weight` is 0, else
    sigma(logit P(match) + itc_weight x cosine), still in [0, 1] and still compared with the threshold."""
    if not itc_weight:
        return match
    p = min(max(match, 1e-30), 1 - 1e-7)  # float32 softmax: 1.0 exactly past a logit of ~17
    z = math.log(p) - math.log1p(-p) + itc_weight * cosine
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


@dataclass
class ValidationScores:
    """Both heads' scores of a validation set's true and false texts: ITM P(match) and ITC cosine, in text order."""

    true_match: list[float]
    true_cosine: list[float]
    false_match: list[float]
    false_cosine: list[float]

    def scores(self, itc_weight: float = 0.0) -> tuple[list[float], list[float]]:
        """(true texts' filter scores, false texts' filter scores) with this ITC weight."""
        true = [filter_score(m, c, itc_weight) for m, c in zip(self.true_match, self.true_cosine, strict=True)]
        false = [filter_score(m, c, itc_weight) for m, c in zip(self.false_match, self.false_cosine, strict=True)]
        return true, false


def score_validation(filter: Blip, rows: Sequence[dict[str, Any]]) -> ValidationScores:
    """The filter's ITM P(match) and ITC cosine for every `captions` text (true) and every `negatives` text (false)
    of `rows` (`{"image": path, "captions": [...], "negatives": [...]}`)."""
    out = ValidationScores([], [], [], [])
    for row in rows:
        texts = list(row["captions"]) + list(row.get("negatives", ()))
        match = filter.match([row["image"]] * len(texts), texts)
        cosine = filter.similarity(row["image"], texts)[0].tolist()
        k = len(row["captions"])
        out.true_match += match[:k]
        out.true_cosine += cosine[:k]
        out.false_match += match[k:]
        out.false_cosine += cosine[k:]
    return out


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """The chance that a random true text scores above a random false one (ties count half)."""
    if not positive or not negative:
        raise ValueError("an AUC needs scores of true and of false texts")
    ranked = sorted([(s, 1) for s in positive] + [(s, 0) for s in negative])
    above = 0.0  # sum over true texts of the false texts below them
    below_false = i = 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        tied = ranked[i:j]
        tied_false = sum(1 for _, label in tied if label == 0)
        above += sum(below_false + tied_false / 2 for _, label in tied if label == 1)
        below_false += tied_false
        i = j
    return above / (len(positive) * len(negative))


def choose_itc_weight(scores: ValidationScores, weights: Sequence[float]) -> tuple[float, dict[float, float]]:
    """The weight in `weights` whose filter scores separate the true from the false texts best (ROC AUC; on a tie,
    the earlier one), and the AUC of each."""
    if not weights or any(not w >= 0 for w in weights):
        raise ValueError(f"ITC weights must be a non-empty list of numbers >= 0, got {list(weights)}")
    auc = {float(w): roc_auc(*scores.scores(w)) for w in weights}
    return max(auc, key=auc.__getitem__), auc  # max keeps the first of equals
