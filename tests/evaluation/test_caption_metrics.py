"""Captioning metrics: hand-worked values, input checks, and a cross-check against pycocoevalcap (Java PTBTokenizer)."""

from __future__ import annotations

import importlib.util
import math
import random
import shutil

import pytest

from blip.evaluation import bleu, caption_scores, cider_d, ptb_tokenize, ptb_tokenize_batch, rouge_l
from blip.evaluation.caption_metrics import _lcs_length

# ---------------------------------------------------------------------------------------------------------------------
# Corpora shared by the cross-checks
# ---------------------------------------------------------------------------------------------------------------------

TRICKY = [
    "A man's dog (black) doesn't sit.",
    "Two people -- one is 3.5 ft. tall -- stand at 10:30 a.m. near St. Mark's.",
    'He said "hi" & left...',
    "A black-and-white photo of 1,000 cats!",
    "I cannot go; gonna stay, wanna come?",
    "A sign reads: 'STOP' [in red] {ok}?",
    "The U.S. flag, e.g. this one, waves. U.S. The end.",
    "mr. smith's 5-year-old son and the kids' toys",
    "It's 5 o'clock; they're rock 'n' roll fans, y'all. 'Tis the '90s!",
    "Dogs' bowls: $5, 50% off, #1 @home, 3/4 cup & 1/2 lb. -- wow!!",
    "An e-mail (me@mail.com) from www.example.com or http://x.com/a/b.",
    "“Smart quotes” and ‘single ones’ — em dash – en dash … ellipsis",
    "café naïve résumé; Mr. Dr. Mrs. Co. Inc. Jan. etc. al. vs. Fig. 3 No. 5 No. way",
    "A sign that says 'no parking' on a 24/7 street; a t-shirt; a 4x4 and a 3-D tv.",
    "Two giraffes... standing  next to   each other .",
    "a :) smiley ;-) and ^_^ face, c++ and C# code, I'm, we'll, you've, she'd",
    "<b>bold</b> 12/25/2020 555-123-4567 5 1/2 ½ £5 €3 ¢ ...",
    "What's that?! It's a bird...a plane!",
    "",
    "   ",
    "...",
    "x. The x. the Jr. X q.r. The file.txt 1.jpg mid-1990s -5 +5 .5",
]

WORDS = "a man woman dog cat two people sitting on of with in the next to table bus street red white".split()
PIECES = [
    "a",
    "the",
    "A",
    "man",
    "dog's",
    "dogs'",
    "don't",
    "it's",
    "cannot",
    "3.5",
    "1,000",
    "10:30",
    "$5",
    "St.",
    "Mr.",
    "U.S.",
    "e.g.",
    "etc.",
    "No.",
    "fig.",
    "black-and-white",
    "t-shirt",
    "(",
    ")",
    '"',
    "'",
    ",",
    ".",
    "!",
    "?",
    ";",
    ":",
    "--",
    "-",
    "...",
    "&",
    "/",
    "'s",
    "n't",
    "[",
    "]",
    "1",
    "20",
    "x",
    "The",
    "I",
    ":)",
]


def _random_corpus(seed: int) -> tuple[dict[int, list[str]], dict[int, str]]:
    """Random word sequences over a small vocabulary (images 0-299) plus punctuation-laden sentences (300-399)."""
    rng = random.Random(seed)
    refs: dict[int, list[str]] = {}
    cands: dict[int, str] = {}
    for i in range(300):
        refs[i] = [" ".join(rng.choices(WORDS, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 6))]
        r = rng.random()
        if r < 0.1:
            cands[i] = rng.choice(refs[i])  # an exact reference
        elif r < 0.15:
            cands[i] = rng.choice(WORDS)  # a single word
        else:
            cands[i] = " ".join(rng.choices(WORDS, k=rng.randint(2, 14)))

    def sentence() -> str:
        parts = []
        for _ in range(rng.randint(1, 14)):
            parts.append(rng.choice(PIECES) if rng.random() < 0.5 else rng.choice(WORDS))
            parts.append(rng.choice([" ", " ", " ", " ", ""]))
        return "".join(parts).strip()

    for i in range(300, 400):
        refs[i] = [sentence() for _ in range(rng.randint(3, 5))]
        cands[i] = sentence()
    for j, text in enumerate(TRICKY):  # every tricky string as a reference and as a candidate
        refs[400 + j] = [text, rng.choice(TRICKY), sentence()]
        cands[400 + j] = TRICKY[-1 - j]
    return refs, cands


# ---------------------------------------------------------------------------------------------------------------------
# Hand-worked values (no Java needed)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A man's dog (black) doesn't sit.", "a man 's dog -lrb- black -rrb- does n't sit"),
        (
            "Two people -- one is 3.5 ft. tall -- stand at 10:30 a.m. near St. Mark's.",
            "two people one is 3.5 ft. tall stand at 10:30 a.m. near st. mark 's",
        ),
        ('He said "hi" & left...', "he said hi & left"),
        ("A black-and-white photo of 1,000 cats!", "a black-and-white photo of 1,000 cats"),
        ("I cannot go; gonna stay", "i can not go gon na stay"),
        ("A sign reads: 'STOP' [in red] {ok}?", "a sign reads stop -lsb- in red -rsb- -lcb- ok -rcb-"),
        ("U.S. flag e.g. this", "u.s. flag e.g. this"),
        ("mr. smith's 5-year-old son", "mr. smith 's 5-year-old son"),
        ("the kids' toys", "the kids toys"),
        ("", ""),
        ("...", ""),
    ],
)
def test_ptb_tokenize_examples(text: str, expected: str) -> None:
    # Expected strings are what coco-caption's Java PTBTokenizer step produces for these captions.
    assert ptb_tokenize(text) == expected


def test_ptb_tokenize_batch_looks_across_lines() -> None:
    # "fig." stays one token when followed by a number, also across the line break of a batch (as in coco-caption).
    assert ptb_tokenize_batch(["a fig.", "3 dogs"]) == ["a fig.", "3 dogs"]
    assert ptb_tokenize("a fig.") == "a fig"
    assert ptb_tokenize_batch([]) == []
    assert ptb_tokenize_batch(["one\ntwo", "three"]) == ["one two", "three"]


def test_bleu_hand_worked() -> None:
    # Perfect match: every precision is 1 (up to coco-caption's 1e-15 / 1e-9 smoothing), no brevity penalty.
    assert bleu({1: ["a b c d"]}, {1: "a b c d"}) == pytest.approx([1.0] * 4, abs=1e-8)
    # Candidate "a b" vs reference "a b c d": p1 = 2/2, p2 = 1/1, p3 = p4 = 0 (smoothed), BP = exp(1 - 4/2).
    scores = bleu({1: ["a b c d"]}, {1: "a b"})
    bp = math.exp(1 - 4 / 2)
    assert scores[0] == pytest.approx(bp, rel=1e-8)
    assert scores[1] == pytest.approx(bp, rel=1e-8)
    assert scores[2] == pytest.approx(bp * (1e-15 / 1e-9) ** (1 / 3), rel=1e-6)
    # Clipping: "the the the" vs "the cat": unigram matches clipped to 1 of 3; closest ref length 2 -> no penalty.
    assert bleu({1: ["the cat"]}, {1: "the the the"})[0] == pytest.approx(1 / 3, rel=1e-8)
    # Closest reference length (ties -> shorter): cand length 3, refs 2 and 4 -> r = 2, no brevity penalty.
    assert bleu({1: ["x y", "x y z w"]}, {1: "x y z"})[0] == pytest.approx(1.0, rel=1e-8)


def test_cider_d_hand_worked() -> None:
    # Two images with disjoint vocabularies, candidate == every reference: each cosine is 1, no length penalty,
    # so each image scores mean(1,1,1,1) * 10 = 10.
    refs = {1: ["a b c d", "a b c d"], 2: ["e f g h"]}
    assert cider_d(refs, {1: "a b c d", 2: "e f g h"}) == pytest.approx(10.0)
    # With one evaluated image every idf is log(1) - log(1) = 0, so CIDEr-D is 0 (as in coco-caption).
    assert cider_d({1: ["a b"]}, {1: "a b"}) == 0.0
    # Length penalty: candidate "e f g h" vs reference "e f g h x": bigram counts 3 vs 4.
    refs = {1: ["a b c d"], 2: ["e f g h x"]}
    score = cider_d(refs, {1: "a b c d", 2: "e f g h"})
    assert 10.0 > score > 5.0


def test_rouge_l_hand_worked() -> None:
    # LCS("a b c", "a c d e") = 2: P = 2/3, R = 2/4, F = (1 + 1.2^2) P R / (R + 1.2^2 P).
    p, r = 2 / 3, 2 / 4
    expected = (1 + 1.44) * p * r / (r + 1.44 * p)
    assert rouge_l({1: ["a c d e"]}, {1: "a b c"}) == pytest.approx(expected)
    # Best precision and best recall are taken over references independently.
    assert rouge_l({1: ["x", "a b c"]}, {1: "a b c"}) == pytest.approx(1.0)
    assert rouge_l({1: ["x y"]}, {1: "a b"}) == 0.0


def test_lcs_matches_dynamic_programming() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a = rng.choices("abcde", k=rng.randint(0, 15))
        b = rng.choices("abcde", k=rng.randint(0, 15))
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
        assert _lcs_length(a, b) == table[-1][-1]


def test_input_validation() -> None:
    refs = {1: ["a dog"], 2: ["a cat"]}
    with pytest.raises(ValueError, match="'missing'"):
        caption_scores(refs, {1: "a dog", "missing": "a cat"})
    with pytest.raises(ValueError, match="empty reference list"):
        bleu({1: []}, {1: "a dog"})
    with pytest.raises(ValueError, match="no candidates"):
        cider_d(refs, {})
    with pytest.raises(TypeError):
        rouge_l({1: "a dog"}, {1: "a dog"})  # a bare string is not a list of references
    # References of ids without a candidate are ignored; coco's {id: [caption]} candidate layout is accepted.
    only = caption_scores({1: ["a dog runs"], 2: ["a cat sleeps"]}, {1: "a dog runs", 2: ["a cat sleeps"]})
    extra = caption_scores({1: ["a dog runs"], 2: ["a cat sleeps"], 3: ["x"]}, {1: "a dog runs", 2: "a cat sleeps"})
    assert only == extra
    assert set(only) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"}


def test_tokenize_flag() -> None:
    refs = {1: ["A dog, running."], 2: ["A cat!"]}
    cands = {1: "a dog running", 2: "a cat"}
    assert caption_scores(refs, cands)["bleu1"] == pytest.approx(1.0, abs=1e-8)
    assert caption_scores(refs, cands, tokenize=False)["bleu1"] < 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Cross-check against pycocoevalcap (needs Java for its PTBTokenizer)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco():
    """pycocoevalcap's tokenizer and scorers, or a skip when it or java is missing."""
    if shutil.which("java") is None:
        pytest.skip("java is not installed: pycocoevalcap's PTBTokenizer needs it")
    if importlib.util.find_spec("pycocoevalcap") is None:
        pytest.skip("pycocoevalcap is not installed (pip install pycocoevalcap)")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer, Bleu, Cider, Rouge


def _coco_tokenize(tokenizer_cls, texts_by_id: dict[int, list[str]]) -> dict[int, list[str]]:
    """One Java call for all captions (the JVM is slow to start)."""
    return tokenizer_cls().tokenize({k: [{"caption": t} for t in v] for k, v in texts_by_id.items()})


def test_ptb_tokenize_matches_java(coco) -> None:
    tokenizer_cls = coco[0]
    java = _coco_tokenize(tokenizer_cls, {0: TRICKY})[0]
    assert ptb_tokenize_batch(TRICKY) == java
    assert [ptb_tokenize(t) for t in TRICKY[:-1]] == java[:-1]


def test_scores_match_pycocoevalcap(coco) -> None:
    tokenizer_cls, bleu_cls, cider_cls, rouge_cls = coco
    refs, cands = _random_corpus(seed=0)
    gts = _coco_tokenize(tokenizer_cls, refs)
    res = _coco_tokenize(tokenizer_cls, {k: [v] for k, v in cands.items()})

    # Tokenisation: identical strings, batch for batch.
    assert ptb_tokenize_batch([t for k in refs for t in refs[k]]) == [t for k in refs for t in gts[k]]
    assert ptb_tokenize_batch(list(cands.values())) == [res[k][0] for k in cands]

    ref_bleu, _ = bleu_cls(4).compute_score(gts, res, verbose=0)
    ref_cider, _ = cider_cls().compute_score(gts, res)
    ref_rouge, _ = rouge_cls().compute_score(gts, res)
    ours = caption_scores(refs, cands)
    assert [ours["bleu1"], ours["bleu2"], ours["bleu3"], ours["bleu4"]] == pytest.approx(ref_bleu, abs=1e-6)
    assert ours["cider"] == pytest.approx(float(ref_cider), abs=1e-6)
    assert ours["rouge_l"] == pytest.approx(float(ref_rouge), abs=1e-6)
    assert 0.05 < ours["bleu4"] < 0.9 and ours["cider"] > 0.1  # a non-degenerate corpus

    # The pure metric functions on pre-tokenized text, including on a subset (CIDEr-D's idf depends on the subset).
    assert bleu(gts, {k: v[0] for k, v in res.items()}) == pytest.approx(ref_bleu, abs=1e-6)
    keys = list(res)[::3]
    sub_gts, sub_res = {k: gts[k] for k in keys}, {k: res[k] for k in keys}
    sub_cands = {k: res[k][0] for k in keys}
    assert cider_d(sub_gts, sub_cands) == pytest.approx(float(cider_cls().compute_score(sub_gts, sub_res)[0]), abs=1e-6)
    assert rouge_l(sub_gts, sub_cands) == pytest.approx(float(rouge_cls().compute_score(sub_gts, sub_res)[0]), abs=1e-6)
