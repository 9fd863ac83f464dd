"""The filter's threshold chosen on validation scores: the cut with the best balanced accuracy."""

from __future__ import annotations

import math
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


def test_filter_score_is_p_match_alone_at_weight_zero_and_adds_the_cosine_otherwise():
    from blip.capfilt import filter_score

    for p in (0.0, 1e-9, 0.3, 0.5, 1.0):
        assert filter_score(p, 0.9, 0.0) == p  # exactly: ITM-only runs are unchanged
    assert filter_score(0.5, 0.0, 20.0) == pytest.approx(0.5)
    assert filter_score(0.5, 0.1, 20.0) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert filter_score(0.2, 0.3, 10.0) == pytest.approx(1 / (1 + math.exp(-(math.log(0.2 / 0.8) + 3.0))))
    # extreme probabilities stay finite and ordered by the cosine
    assert 0.0 < filter_score(0.0, -1.0, 20.0) < filter_score(0.0, 1.0, 20.0) <= 1.0
    assert filter_score(1.0, -1.0, 20.0) < filter_score(1.0, 1.0, 20.0) <= 1.0


def test_roc_auc_counts_pairs_and_ties_half():
    from blip.capfilt.calibrate import roc_auc

    rng = random.Random(1)
    positive = [round(rng.random(), 1) for _ in range(40)]
    negative = [round(rng.random() * 0.8, 1) for _ in range(30)]
    brute = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative) / (40 * 30)
    assert roc_auc(positive, negative) == pytest.approx(brute)
    assert roc_auc([1.0, 2.0], [0.0]) == 1.0 and roc_auc([0.0], [1.0]) == 0.0 and roc_auc([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="AUC needs"):
        roc_auc([], [1.0])


def test_the_itc_weight_is_the_one_that_separates_validation_texts_best():
    from blip.capfilt import ValidationScores, choose_itc_weight

    # ITM alone cannot tell these apart (same P(match)); the cosine can
    scores = ValidationScores([0.6, 0.6, 0.6], [0.5, 0.4, 0.45], [0.6, 0.6], [0.1, 0.2])
    weight, auc = choose_itc_weight(scores, [0.0, 5.0, 20.0])
    assert auc == {0.0: 0.5, 5.0: 1.0, 20.0: 1.0} and weight == 5.0  # a tie goes to the earlier weight
    assert scores.scores(0.0) == ([0.6, 0.6, 0.6], [0.6, 0.6])
    # where the cosine points the wrong way, ITM alone wins
    wrong = ValidationScores([0.9, 0.8], [0.1, 0.1], [0.2, 0.3], [0.9, 0.8])
    assert choose_itc_weight(wrong, [0.0, 5.0, 20.0])[0] == 0.0
    for bad in ([], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="ITC weights must be"):
            choose_itc_weight(scores, bad)
