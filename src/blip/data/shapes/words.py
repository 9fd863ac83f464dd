"""The language of the world: the words and phrases of captions, questions, answers and junk text."""

from __future__ import annotations

import re

from blip.data.shapes.scene import BACKGROUNDS, KINDS, POSITIONS, SHAPE_COLORS, SIZES

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small",), "large": ("large", "big")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "center": ("in the center", "in the middle"),
}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
JUNK_PHRASES: tuple[str, ...] = (
    "buy now",
    "best price",
    "free shipping",
    "click here",
    "hot sale",
    "new",
    "hd wallpaper",
    "stock photo",
    "download",
    "online shop",
    "order today",
    "cheap",
    "2019",
    "2020",
    "1080p",
    "jpg",
    "logo",
)
# Answers a human annotator may give instead of the canonical one (kept verbatim, as VQAv2 keeps them).
ANSWER_SYNONYMS: dict[str, str] = {
    "large": "big",
    "center": "middle",
    "gray": "grey",
    "1": "one",
    "2": "two",
    "3": "three",
}
# How a caption says each relation of `blip.data.shapes.scene.relation`.
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
# Every answer by kind of question: a human annotator's mistake is another answer of the same group.
ANSWER_GROUPS: dict[str, tuple[str, ...]] = {
    "color": tuple(SHAPE_COLORS),
    "background": tuple(BACKGROUNDS),
    "shape": KINDS,
    "position": tuple(POSITIONS),
    "size": tuple(SIZES),
    "number": tuple(str(i) for i in range(len(POSITIONS) + 1)),
    "yes/no": ("yes", "no"),
}
ANSWER_LIST: tuple[str, ...] = tuple(sorted({a for group in ANSWER_GROUPS.values() for a in group}))

_WORD_RE = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase words of a text, punctuation dropped (the tokenisation the parser and `vocabulary` use)."""
    return _WORD_RE.findall(text.lower())


def vocabulary() -> list[str]:
    """Every word that generated captions, questions, answers (human ones included) and junk text can contain."""
    phrases: list[str] = [
        *SHAPE_COLORS,
        *BACKGROUNDS,
        *KINDS,
        *(w for words in SIZE_WORDS.values() for w in words),
        *(p for ps in POSITION_PHRASES.values() for p in ps),
        *RELATION_PHRASES.values(),
        *COUNT_WORDS[1 : len(POSITIONS) + 1],
        *JUNK_PHRASES,
        *ANSWER_LIST,
        *ANSWER_SYNONYMS.values(),
        "a an and single shape shapes background there is are with",
        "what color how many where size",
    ]
    return sorted({w for p in phrases for w in tokenize(p)})


def article(word: str) -> str:
    """ "a" or "an" before `word`."""
    return "an" if word[0] in "aeiou" else "a"
