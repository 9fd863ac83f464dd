"""NLVR2 evaluation: accuracy of `Blip.reason` on a split's pairs (and per template for the shapes world)."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from blip.data.manifests import DataError
from blip.data.nlvr import NlvrPair

if TYPE_CHECKING:
    from blip.api import Blip
    from blip.evaluation.run import EvalResult


def evaluate_nlvr(blip: Blip, pairs: list[NlvrPair]) -> EvalResult:
    """accuracy (%), the majority-class baseline on the same pairs, and accuracy per template when known."""
    from blip.evaluation.run import EvalResult

    if not pairs:
        raise DataError("no NLVR pairs to evaluate (an empty annotation file?)")
    verdicts = blip.reason([p.image_a for p in pairs], [p.image_b for p in pairs], [p.statement for p in pairs])
    correct = [v.label == p.label for v, p in zip(verdicts, pairs)]
    majority = max(Counter(p.label for p in pairs).values())
    metrics = {
        "accuracy": 100.0 * sum(correct) / len(pairs),
        "majority_baseline": 100.0 * majority / len(pairs),
        "pairs": float(len(pairs)),
    }
    by_template: dict[str, list[bool]] = defaultdict(list)
    for ok, p in zip(correct, pairs):
        if p.template:
            by_template[p.template].append(ok)
    for template, oks in sorted(by_template.items()):
        metrics[f"accuracy_{template}"] = 100.0 * sum(oks) / len(oks)
    predictions = [
        {"id": p.id, "statement": p.statement, "label": p.label, "predicted": v.label, "score": v.score}
        for p, v in zip(pairs, verdicts)
    ]
    return EvalResult("nlvr", metrics, predictions)
