"""The filter's threshold chosen on validation scores: the cut with the best balanced accuracy."""

from __future__ import annotations

import random

import pytest

from blip.capfilt import choose_threshold


def _balanced_accuracy(positive, negative, threshold):
    return (
        sum(p >= threshold for p in positive) / len(positive) + sum(n < threshold for n in negative) / len(negative)
    ) / 2


def test_separable_scores_are_cut_between_the_two_groups():
    chosen = choose_threshold([0.30, 0.4, 0.9], [0.01, 0.02, 0.2])
    assert chosen["threshold"] == pytest.approx(0.25)
    assert chosen["kept_true"] == chosen["removed_false"] == chosen["balanced_accuracy"] == 1.0


def test_the_choice_is_the_best_cut_whatever_the_group_sizes():
    rng = random.Random(0)
    positive = [rng.betavariate(5, 2) for _ in range(200)]
    negative = [rng.betavariate(2, 4) for _ in range(37)]
    chosen = choose_threshold(positive, negative)
    best = max(_balanced_accuracy(positive, negative, t) for t in positive + negative + [1.1])
    assert chosen["balanced_accuracy"] == pytest.approx(best)
    assert _balanced_accuracy(positive, negative, chosen["threshold"]) == pytest.approx(best)
    assert 0.2 < chosen["threshold"] < 0.8


def test_all_true_texts_above_all_false_ones_is_not_required():
    chosen = choose_threshold([0.9, 0.1], [0.5])  # keeping the 0.9 and removing the 0.5 beats any other cut
    assert chosen["threshold"] == pytest.approx(0.7) and chosen["balanced_accuracy"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="true and of false"):
        choose_threshold([], [0.5])


def test_keep_true_is_the_strictest_cut_that_keeps_that_share_of_true_texts():
    rng = random.Random(1)
    positive = [rng.random() for _ in range(250)]
    negative = [rng.random() * 0.5 for _ in range(500)]
    for share in (0.9, 0.95, 0.5):
        chosen = choose_threshold(positive, negative, keep_true=share)
        kept = sum(p >= chosen["threshold"] for p in positive) / len(positive)
        assert kept == chosen["kept_true"] >= share
        # one more true text below the cut and fewer than `share` would be kept
        assert (sum(p >= chosen["threshold"] for p in positive) - 1) / len(positive) < share
        assert chosen["removed_false"] == sum(n < chosen["threshold"] for n in negative) / len(negative)
    assert choose_threshold([0.3, 0.6], [0.1], keep_true=0.5)["threshold"] == pytest.approx(0.45)
    assert choose_threshold([0.3, 0.6], [0.1], keep_true=1.0)["threshold"] == 0.3  # every true text kept
    with pytest.raises(ValueError, match="keep_true"):
        choose_threshold([0.3], [0.1], keep_true=0.0)
