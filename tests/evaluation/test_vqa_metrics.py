"""VQA accuracy: the official leave-one-out formula, worked by hand, and the official answer normalisation."""

from __future__ import annotations

import pytest

from blip.evaluation import (
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
    vqa_evaluate,
    vqa_question_accuracy,
)


def _answers(k: int, match: str = "yes", other: str = "no") -> list[str]:
    """Ten human answers of which ``k`` are ``match``."""
    return [match] * k + [other] * (10 - k)


# Leave-one-out by hand, 10 answers with k equal to the prediction:
#   a left-out matching answer leaves k-1 matches, a left-out other answer leaves k; each scores min(1, m/3).
#   k=1: (1*0 + 9*(1/3)) / 10 = 0.3      k=2: (2*(1/3) + 8*(2/3)) / 10 = 0.6
#   k=3: (3*(2/3) + 7*1) / 10 = 0.9      k=4: (4*1 + 6*1) / 10 = 1.0
@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 30.0), (2, 60.0), (3, 90.0), (4, 100.0), (10, 100.0)])
def test_leave_one_out_by_hand(k: int, expected: float) -> None:
    assert 100 * vqa_question_accuracy("yes", _answers(k)) == pytest.approx(expected)
    assert vqa_accuracy(["yes"], [_answers(k)]) == pytest.approx(expected)


def test_corpus_mean_rounding_and_answer_types() -> None:
    preds = ["yes", "2", "red", "cat"]
    answers = [_answers(4), _answers(1, "2", "3"), _answers(2, "red", "blue"), ["cat"] * 10]
    result = vqa_evaluate(preds, answers, answer_types=["yes/no", "number", "other", "other"])
    assert result.per_question == pytest.approx([100.0, 30.0, 60.0, 100.0])
    assert result.overall == round((100 + 30 + 60 + 100) / 4, 2) == 72.5
    assert result.per_answer_type == {"yes/no": 100.0, "number": 30.0, "other": 80.0}
    # Rounding to 2 decimals like the official script (1/3 of questions right -> 33.33).
    preds = ["cat", "dog", "cow"]
    assert vqa_accuracy(preds, [_answers(10, "cat"), _answers(0, "x"), _answers(0, "x")]) == 33.33
    assert vqa_evaluate(preds, [["cat"], ["x"], ["x"]], precision=None).overall == pytest.approx(100 / 3)
    # An answer that is only an article normalises to the empty string (official behaviour).
    assert normalize_answer("a") == ""


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),
        ("ten", "10"),
        ("none", "0"),
        ("the dog.", "dog"),
        ("An apple", "apple"),
        ("yes!", "yes"),
        ("Yes, sir.", "yes sir"),  # ", " is next to a space: the comma is deleted, not spaced
        ("red/blue", "red blue"),  # no space next to "/": it becomes a space
        ("1,000", "1000"),  # digit-comma-digit: all punctuation is deleted, so the number stays one word
        ("3.5", "3.5"),  # a period before a digit is kept
        ("5 p.m.", "5 pm"),
        ("dont", "don't"),
        ("youre", "you're"),
        ("isnt it", "isn't it"),
        ("\tRed\n", "red"),
        ("  many   spaces ", "many spaces"),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_punctuation_step_alone() -> None:
    assert process_punctuation("black & white") == "black & white"  # "&" is not in the official list
    assert process_punctuation("t-shirt") == "t shirt"
    assert process_punctuation("t - shirt") == "t  shirt"
    assert process_punctuation("." * 40) == "." * 8  # the official script removes at most 32 periods


def test_prediction_normalised_ground_truth_only_punctuated() -> None:
    # Prediction "Two." -> "2" matches ground truth "2".
    assert vqa_question_accuracy("Two.", ["2"] * 10) == 1.0
    # All annotators agree: ground truth is used as is (not lowercased), so "Dog" never matches the normalised "dog".
    assert vqa_question_accuracy("dog", ["Dog"] * 10) == 0.0
    # Annotators disagree: ground truth gets the punctuation step only -> "yes." counts as "yes" ...
    assert vqa_question_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # ... while "yes!" becomes "yes " (the "!" turns into a space and ground truth is not stripped again): no match.
    assert vqa_question_accuracy("yes", ["yes!"] * 3 + ["no"] * 7) == 0.0
    # ... but no number-word step: "two" in the ground truth does not match the normalised prediction "2".
    assert vqa_question_accuracy("two", ["two"] * 3 + ["2"] * 7) == 1.0  # 7 x "2" match
    assert vqa_question_accuracy("2", ["two"] * 7 + ["three"] * 3) == 0.0


def test_fewer_than_ten_answers() -> None:
    # Leave-one-out over the answers given: 3 answers, all equal to the prediction -> each left-out sees 2 -> 2/3.
    assert vqa_question_accuracy("yes", ["yes"] * 3) == pytest.approx(2 / 3)
    # 5 answers, 4 match: left-out match sees 3 -> 1; left-out other sees 4 -> 1.
    assert vqa_question_accuracy("yes", ["yes"] * 4 + ["no"]) == 1.0
    # One answer: leave-one-out would always give 0, so it is exact match.
    assert vqa_question_accuracy("Yes.", ["yes"]) == 1.0
    assert vqa_question_accuracy("no", ["yes"]) == 0.0


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1"):
        vqa_accuracy(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="question 1"):
        vqa_accuracy(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="no predictions"):
        vqa_accuracy([], [])
    with pytest.raises(ValueError, match="answer types"):
        vqa_evaluate(["a"], [["a"]], answer_types=["x", "y"])


def test_exact_match_mode_skips_the_official_normalisation():
    """`normalize=False` (the shapes world's canonical answers): the same leave-one-out formula on the raw strings."""
    assert vqa_question_accuracy("two", ["2"] * 10) == 1.0  # "two" -> "2" officially
    assert vqa_question_accuracy("two", ["2"] * 10, normalize=False) == 0.0
    assert vqa_question_accuracy("red", ["red"] * 3 + ["blue"] * 7, normalize=False) == pytest.approx(0.9)
    assert vqa_question_accuracy("Red", ["red"] * 10, normalize=False) == 0.0
