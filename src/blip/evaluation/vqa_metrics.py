"""VQA accuracy as the official VQA evaluation computes it (the metric BLIP reports on VQAv2).

Per question, each of the human answers is left out in turn and the prediction scores ``min(1, matches / 3)``
against the remaining answers; the question's accuracy is the mean of those scores. With 10 answers of which ``k``
equal the prediction that is 0, 0.3, 0.6, 0.9 and 1.0 for ``k`` = 0, 1, 2, 3 and >= 4. Corpus accuracy is the mean
over questions, x100, rounded to 2 decimals.

Normalisation follows the official script, quirks included:

* the prediction: newlines/tabs -> spaces, stripped; punctuation handled by :func:`process_punctuation`; then
  :func:`process_digit_article` (lowercase, number words ``none``/``zero``..``ten`` -> digits, articles ``a an the``
  dropped, contractions restored from a fixed table: ``dont`` -> ``don't``);
* the ground-truth answers: newlines/tabs -> spaces, stripped, and :func:`process_punctuation` **only** when the
  annotators disagree (no lowercasing, no number words, no contractions).

Fewer than 10 answers: the leave-one-out mean is taken over however many answers are given, which is what the
official script computes for such questions. A single answer leaves nothing to compare against, so it is scored by
exact match (1 or 0) instead of the always-zero leave-one-out value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "VQAResult",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "vqa_accuracy",
    "vqa_evaluate",
    "vqa_question_accuracy",
]

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official script calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in ``count``, so at most 32
# periods are removed. Kept for equality.
_MAX_PERIODS_REMOVED = 32

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table, as "written -> restored" pairs. Keys that contain capitals (I'm, I've, I'd've) can
# never match, since words are lowercased first; they are kept for fidelity. "somebody'd" -> "somebodyd" is the
# official table's (sic).
_CONTRACTION_PAIRS = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't | couldn'tve couldn't've
couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't | hadnt hadn't | hadnt've hadn't've
hadn'tve hadn't've | hasnt hasn't | havent haven't | hed he'd | hed've he'd've | he'dve he'd've | hes he's
howd how'd | howll how'll | hows how's | Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't | itd it'd
itd've it'd've | it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't | mightnt've mightn't've
mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've | neednt needn't | notve not've
oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at | 'ow'sat 'ow's'at | shant shan't
shed've she'd've | she'dve she'd've | she's she's | shouldve should've | shouldnt shouldn't | shouldnt've shouldn't've
shouldn'tve shouldn't've | somebody'd somebodyd | somebodyd've somebody'd've | somebody'dve somebody'd've
somebodyll somebody'll | somebodys somebody's | someoned someone'd | someoned've someone'd've
someone'dve someone'd've | someonell someone'll | someones someone's | somethingd something'd
somethingd've something'd've | something'dve something'd've | somethingll something'll | thats that's
thered there'd | thered've there'd've | there'dve there'd've | therere there're | theres there's | theyd they'd
theyd've they'd've | they'dve they'd've | theyll they'll | theyre they're | theyve they've | twas 'twas
wasnt wasn't | wed've we'd've | we'dve we'd've | weve we've | werent weren't | whatll what'll | whatre what're
whats what's | whatve what've | whens when's | whered where'd | wheres where's | whereve where've | whod who'd
whod've who'd've | who'dve who'd've | wholl who'll | whos who's | whove who've | whyll why'll | whyre why're
whys why's | wont won't | wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've | wouldn'tve wouldn't've
yall y'all | yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've | y'alld've y'all'd've | y'all'dve y'all'd've
youd you'd | youd've you'd've | you'dve you'd've | youll you'll | youre you're | youve you've
"""
_CONTRACTIONS = dict(pair.split() for pair in _CONTRACTION_PAIRS.replace("\n", " | ").split("|") if pair.strip())


def process_punctuation(text: str) -> str:
    """The official punctuation step.

    Each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it stands next to a space anywhere in the
    text, or when the text contains a digit-comma-digit (so ``"1,000"`` -> ``"1000"``); otherwise it becomes a space
    (``"a/b"`` -> ``"a b"``). Then periods not followed by a digit are deleted (``"3.5"`` keeps its period).
    """
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        if has_digit_comma or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """The official word step: lowercase, number words to digits, drop articles, restore contractions."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Normalise a predicted answer as the official VQA evaluation does (e.g. ``"Two dogs."`` -> ``"2 dogs"``)."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def vqa_question_accuracy(prediction: str, answers: Sequence[str], *, normalize: bool = True) -> float:
    """Accuracy (0-1) of one prediction against the human answers of one question.

    Args:
        prediction: The model's answer (raw; normalised here).
        answers: The human answers (raw), normally 10.
        normalize: Apply the official normalisation (on by default); ``False`` compares the strings exactly, for
            answers that are canonical already (the shapes world).

    Returns:
        Mean over left-out answers of ``min(1, matches among the others / 3)``; exact match for a single answer.
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError("answers must be a non-empty list of strings")
    if normalize:
        pred = normalize_answer(prediction)
        gts = [_clean_whitespace(a) for a in answers]
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
    else:
        pred, gts = prediction, list(answers)
    if len(gts) == 1:
        return float(gts[0] == pred)
    total_matches = sum(gt == pred for gt in gts)
    scores = [min(1.0, (total_matches - (gt == pred)) / 3.0) for gt in gts]
    return sum(scores) / len(scores)


@dataclass
class VQAResult:
    """Output of :func:`vqa_evaluate`; accuracies are percentages."""

    overall: float  # mean over questions, x100, rounded like the official script
    per_question: list[float]  # x100, not rounded, in input order
    per_answer_type: dict[str, float] = field(default_factory=dict)  # e.g. {"yes/no": ..., "number": ..., "other": ...}


def _round(value: float, precision: int | None) -> float:
    return value if precision is None else round(value, precision)


def vqa_evaluate(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    answer_types: Sequence[str] | None = None,
    precision: int | None = 2,
) -> VQAResult:
    """VQA accuracy with per-question scores and, when ``answer_types`` is given, a per-answer-type breakdown.

    Args:
        predictions: One predicted answer per question.
        answers: The human answers of each question (normally 10).
        answer_types: Optional answer type of each question (VQAv2: "yes/no", "number", "other").
        precision: Decimals of ``overall`` and ``per_answer_type`` (the official script uses 2); ``None`` keeps all.

    Returns:
        A :class:`VQAResult`.
    """
    if isinstance(predictions, str) or len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions for {len(answers)} answer lists")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    if answer_types is not None and len(answer_types) != len(predictions):
        raise ValueError(f"got {len(answer_types)} answer types for {len(predictions)} predictions")
    accs = []
    for i, (pred, gts) in enumerate(zip(predictions, answers)):
        try:
            accs.append(vqa_question_accuracy(pred, gts))
        except ValueError as err:
            raise ValueError(f"question {i}: {err}") from None
    by_type: dict[str, list[float]] = {}
    if answer_types is not None:
        for acc, ans_type in zip(accs, answer_types):
            by_type.setdefault(ans_type, []).append(acc)
    return VQAResult(
        overall=_round(100.0 * sum(accs) / len(accs), precision),
        per_question=[100.0 * a for a in accs],
        per_answer_type={t: _round(100.0 * sum(v) / len(v), precision) for t, v in by_type.items()},
    )


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Official VQA accuracy in percent (rounded to 2 decimals) of ``predictions`` against ``answers``."""
    return vqa_evaluate(predictions, answers).overall
