"""The shapes world: a seeded synthetic image-text dataset with the structure BLIP exploits.

Each image is a plain background with 1-3 coloured shapes (circle, square, triangle, star, diamond), each small or
large, at one of five non-colliding positions (left, right, top, bottom, center), with light texture noise. A scene
(`Scene`) describes the image exactly, so every caption, question and answer can be checked against it.

Everything is a pure function of ``(seed, split, index)``: any image or manifest row can be regenerated alone
(`make_example`), generation runs in parallel and resumes where it stopped. The splits stand in for the datasets BLIP
trains and evaluates on:

- ``clean`` (COCO): 5 reference captions per image, paraphrases of the true scene.
- ``web`` (the noisy web): one caption per image that is ``correct``, ``partial`` (one colour, shape or position
  swapped), ``unrelated`` (the caption of another image) or ``junk`` (ad-like text), at set rates, with the noise
  label kept in the row for evaluation.
- ``vqa`` (VQAv2): several questions per image with an answer and 10 "human" answers for the official accuracy.
- ``test``: 5 references per image (captioning, retrieval) and questions about the same images (VQA).

On disk (``generate`` / ``blip data shapes --out DIR``)::

    images/<split>/<index:06d>.png      split in clean, web, vqa, test
    clean.jsonl   {"id", "image", "captions": [5], "scene"}
    test.jsonl    {"id", "image", "captions": [5], "scene"}
    web.jsonl     {"id", "image", "caption", "noise", "noise_detail", "source", "scene"}
                  noise: correct|partial|unrelated|junk; noise_detail: the swapped attribute of a partial caption
                  (color|shape|position); source: for unrelated, the id of the image whose scene the caption
                  describes (a fresh paraphrase of it); scene: the true scene (`Scene.to_dict`), in every manifest
    vqa.jsonl, vqa_test.jsonl
                  {"id", "question_id", "image_id", "image", "question", "answer", "answers": [10],
                   "answer_type", "question_type"}   (one row per question)
    answer_list.json                    every canonical answer, for rank-mode VQA
    dataset_shapes.json                 Karpathy-style captions ("dataset_coco.json"): clean as split "train",
                                        test as split "test"; filepath + filename, sentences with raw and tokens
    captions_test_coco.json             COCO caption annotations of the test split (what pycocoevalcap reads)
    vqa_test_questions.json, vqa_test_annotations.json
                                        a VQAv2-style question / annotation pair for the test questions
    web-000000.tar ...                  with ``webdataset=True``: WebDataset shards of the web split, members
                                        <key>.png, <key>.txt (the caption), <key>.json (the web.jsonl row)
    meta.json                           seed, arguments, counts, noise rates, vocabulary size, file list

``"image"`` paths are relative to the output folder; ``"id"`` is ``"<split>-<index:06d>"`` (VQA rows add the question
number); integer ``image_id``/``question_id`` are the index within the split and ``image_id * 100 + k``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from blip.evaluation.vqa import vqa_question_accuracy
from blip.io import atomic_write_bytes, json_bytes, jsonl_bytes

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

# ----------------------------------------------------------------------------------------------------------------------
# The world: colours, shapes, sizes, positions.

SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "pink": (245, 130, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SIZES: dict[str, float] = {"small": 0.09, "large": 0.14}  # outer radius, as a fraction of the image side
# Slot centres as fractions of the side. Neighbouring slots are 0.32 apart, more than two large radii plus jitter
# (2 * 0.14 + 2 * 0.012), so shapes never touch.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.18, 0.5),
    "right": (0.82, 0.5),
    "top": (0.5, 0.18),
    "bottom": (0.5, 0.82),
    "center": (0.5, 0.5),
}
NOISE_KINDS: tuple[str, ...] = ("correct", "partial", "unrelated", "junk")
PARTIAL_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position")
SPLITS: tuple[str, ...] = ("clean", "web", "vqa", "test")

# ----------------------------------------------------------------------------------------------------------------------
# The language: words and phrases of captions, questions, answers and junk.

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
_RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
_TEMPLATES: tuple[str, ...] = ("list", "there", "count", "background", "background_first", "relation")
# Templates that can state the absolute position of every shape (used for position swaps, which must be visible).
_POSITION_TEMPLATES: tuple[str, ...] = ("list", "there", "background", "background_first")

_ANSWER_GROUPS: dict[str, tuple[str, ...]] = {
    "color": tuple(SHAPE_COLORS),
    "background": tuple(BACKGROUNDS),
    "shape": KINDS,
    "position": tuple(POSITIONS),
    "size": tuple(SIZES),
    "number": tuple(str(i) for i in range(len(POSITIONS) + 1)),
    "yes/no": ("yes", "no"),
}
ANSWER_LIST: tuple[str, ...] = tuple(sorted({a for group in _ANSWER_GROUPS.values() for a in group}))

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
        *_RELATION_PHRASES.values(),
        *COUNT_WORDS[1 : len(POSITIONS) + 1],
        *JUNK_PHRASES,
        *ANSWER_LIST,
        *ANSWER_SYNONYMS.values(),
        "a an and single shape shapes background there is are with",
        "what color how many where size",
    ]
    return sorted({w for p in phrases for w in tokenize(p)})


# ----------------------------------------------------------------------------------------------------------------------
# Configuration and scenes.


@dataclass(frozen=True)
class ShapesConfig:
    """How images, texts and noise are generated. Everything here is recorded in ``meta.json``."""

    image_size: int = 64  # side of the square images, pixels
    min_shapes: int = 1  # shapes per image, at least
    max_shapes: int = 3  # shapes per image, at most (<= 5: one per position, distinct kinds and colours)
    texture: bool = True  # add light per-pixel texture noise
    texture_strength: float = 6.0  # standard deviation of the texture noise, in 0-255 units
    antialias: bool = True  # draw at 4x and box-downsample
    jitter: float = 0.012  # random offset of each shape's centre, fraction of the side (keeps shapes apart)
    noise_rates: tuple[float, float, float, float] = (0.5, 0.2, 0.2, 0.1)  # web: correct, partial, unrelated, junk
    n_references: int = 5  # reference captions per clean / test image
    questions_per_image: int = 5  # VQA questions per vqa / test image
    human_noise: float = 0.2  # chance that each of the 10 human answers deviates (at most 4 of 10 do)

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        if not 1 <= self.min_shapes <= self.max_shapes <= len(POSITIONS):
            raise ValueError(f"need 1 <= min_shapes <= max_shapes <= {len(POSITIONS)}, got {self.min_shapes}..")
        if len(self.noise_rates) != len(NOISE_KINDS) or any(r < 0 for r in self.noise_rates):
            raise ValueError(f"noise_rates must be {len(NOISE_KINDS)} non-negative numbers {NOISE_KINDS}")
        if abs(sum(self.noise_rates) - 1.0) > 1e-6:
            raise ValueError(f"noise_rates must sum to 1, got {self.noise_rates} (sum {sum(self.noise_rates)})")
        if not 0 <= self.jitter <= 0.015:
            raise ValueError("jitter must be in [0, 0.015] so that shapes cannot touch")
        if self.n_references < 1 or self.questions_per_image < 1:
            raise ValueError("n_references and questions_per_image must be positive")
        if not 0 <= self.human_noise <= 1:
            raise ValueError("human_noise must be in [0, 1]")


@dataclass(frozen=True)
class Shape:
    """One shape of a scene."""

    kind: str  # one of KINDS
    color: str  # one of SHAPE_COLORS
    size: str  # "small" or "large"
    position: str  # one of POSITIONS
    offset: tuple[float, float] = (0.0, 0.0)  # jitter of the centre, fraction of the side

    def center(self) -> tuple[float, float]:
        """Centre as fractions of the image side (x right, y down)."""
        x, y = POSITIONS[self.position]
        return x + self.offset[0], y + self.offset[1]


@dataclass(frozen=True)
class Scene:
    """Everything an image shows. Kinds, colours and positions are distinct within a scene, so "the circle" and
    "the red shape" always name one shape."""

    background: str  # one of BACKGROUNDS
    shapes: tuple[Shape, ...]
    texture_seed: int = 0  # seeds the texture noise

    def find(self, kind: str | None = None, color: str | None = None) -> Shape | None:
        """The shape with this kind and/or colour, or None."""
        for s in self.shapes:
            if (kind is None or s.kind == kind) and (color is None or s.color == color):
                return s
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "background": self.background,
            "shapes": [
                {"kind": s.kind, "color": s.color, "size": s.size, "position": s.position, "offset": list(s.offset)}
                for s in self.shapes
            ],
            "texture_seed": self.texture_seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        shapes = tuple(
            Shape(s["kind"], s["color"], s["size"], s["position"], tuple(s.get("offset", (0.0, 0.0))))  # type: ignore[arg-type]
            for s in d["shapes"]
        )
        return cls(d["background"], shapes, int(d.get("texture_seed", 0)))


@dataclass(frozen=True)
class QA:
    """A question about a scene with its canonical answer and 10 simulated human answers."""

    question: str
    answer: str
    answers: tuple[str, ...]  # 10 human answers, mostly `answer`
    answer_type: str  # VQAv2 types: "yes/no", "number", "other"
    question_type: str  # e.g. "what color is the", "how many"


def sample_scene(rng: random.Random, cfg: ShapesConfig = ShapesConfig()) -> Scene:
    """Draw a random scene: distinct kinds, colours and positions; a size and a small jitter per shape."""
    n = rng.randint(cfg.min_shapes, cfg.max_shapes)
    kinds = rng.sample(KINDS, n)
    colors = rng.sample(tuple(SHAPE_COLORS), n)
    positions = rng.sample(tuple(POSITIONS), n)
    shapes = []
    for kind, color, position in zip(kinds, colors, positions):
        size = rng.choice(tuple(SIZES))
        offset = (round(rng.uniform(-cfg.jitter, cfg.jitter), 4), round(rng.uniform(-cfg.jitter, cfg.jitter), 4))
        shapes.append(Shape(kind, color, size, position, offset))
    background = rng.choice(tuple(BACKGROUNDS))
    return Scene(background, tuple(shapes), rng.getrandbits(32))


# ----------------------------------------------------------------------------------------------------------------------
# Rendering.


def _outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of outer radius r (not used for circles)."""

    def ring(radii: Sequence[float], start: float) -> list[tuple[float, float]]:
        k = len(radii)
        return [
            (cx + rr * np.cos(start + 2 * np.pi * i / k), cy + rr * np.sin(start + 2 * np.pi * i / k))
            for i, rr in enumerate(radii)
        ]

    if kind == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return ring([r] * 3, -np.pi / 2)
    if kind == "star":
        return ring([r, 0.5 * r] * 5, -np.pi / 2)
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    raise ValueError(f"unknown shape kind {kind!r}")


def render(scene: Scene, cfg: ShapesConfig = ShapesConfig()) -> Image.Image:
    """Draw a scene as an RGB image of ``cfg.image_size`` pixels. A pure function of (scene, cfg)."""
    ss = 4 if cfg.antialias else 1
    side = cfg.image_size * ss
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x, y = s.center()
        cx, cy, r = x * side, y * side, SIZES[s.size] * side
        fill = SHAPE_COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_outline(s.kind, cx, cy, r), fill=fill)
    if ss > 1:
        img = img.reduce(ss)
    if cfg.texture and cfg.texture_strength > 0:
        noise = np.random.default_rng(scene.texture_seed).normal(0.0, cfg.texture_strength, (*img.size[::-1], 1))
        pixels = np.asarray(img, dtype=np.float32) + noise
        img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return img


# ----------------------------------------------------------------------------------------------------------------------
# Captions.


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(shape: Shape, rng: random.Random, *, single: bool = False) -> str:
    """ "a red circle", "a big red circle", "an orange star"; with single: "a single small red circle"."""
    words = [rng.choice(SIZE_WORDS[shape.size])] if rng.random() < 0.4 else []
    words += [shape.color, shape.kind]
    if single:
        return "a single " + " ".join(words)
    return f"{_article(words[0])} {' '.join(words)}"


def _located(shape: Shape, rng: random.Random) -> str:
    return f"{_noun_phrase(shape, rng)} {rng.choice(POSITION_PHRASES[shape.position])}"


def _join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _relation(a: Shape, b: Shape) -> str | None:
    """The relation word of a to b when both sit on one row or column of slots ("left of", "above", ...)."""
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    if ay == by:
        return "left of" if ax < bx else "right of"
    if ax == bx:
        return "above" if ay < by else "below"
    return None


def _relation_holds(a: Shape, rel: str, b: Shape) -> bool:
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]


def _templates_for(scene: Scene, positions: bool) -> tuple[str, ...]:
    if positions:
        return _POSITION_TEMPLATES
    pairs = any(_relation(a, b) for a in scene.shapes for b in scene.shapes if a is not b)
    return tuple(t for t in _TEMPLATES if t != "relation" or pairs)


def describe(scene: Scene, rng: random.Random, *, template: str | None = None, positions: bool = False) -> str:
    """One caption of the scene, a paraphrase drawn from a small grammar.

    Every caption names each shape by colour and kind; sizes, positions, relations, the background and the count are
    stated by some paraphrases and not others. With ``positions=True`` the caption states every shape's position.
    """
    names = _templates_for(scene, positions)
    if template is None:
        template = rng.choice(names)
    elif template not in names:
        raise ValueError(f"template {template!r} does not apply here; choose from {names}")
    shapes = list(scene.shapes)
    rng.shuffle(shapes)
    n = len(shapes)
    locate = positions or rng.random() < 0.5
    phrase = (lambda s: _located(s, rng)) if locate else (lambda s: _noun_phrase(s, rng))
    if template == "list":
        return _join([_located(s, rng) for s in shapes])
    if template == "there":
        if n == 1:
            return "there is " + _located(shapes[0], rng)
        return f"there are {COUNT_WORDS[n]} shapes: " + _join([_located(s, rng) for s in shapes])
    if template == "count":
        if n == 1:
            return _noun_phrase(shapes[0], rng, single=True)
        return f"{COUNT_WORDS[n]} shapes: " + _join([_noun_phrase(s, rng) for s in shapes])
    if template == "background":
        return _join([phrase(s) for s in shapes]) + f" on a {scene.background} background"
    if template == "background_first":
        return f"a {scene.background} background with " + _join([phrase(s) for s in shapes])
    if template == "relation":
        pairs = [(a, b) for a in shapes for b in shapes if a is not b and _relation(a, b)]
        a, b = rng.choice(pairs)
        text = f"{_noun_phrase(a, rng)} {_RELATION_PHRASES[_relation(a, b)]} {_noun_phrase(b, rng)}"  # type: ignore[index]
        rest = [s for s in shapes if s is not a and s is not b]
        return text + "".join(f" and {_located(s, rng)}" for s in rest)
    raise ValueError(f"unknown template {template!r}")


def references(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """n distinct paraphrases of the scene (as distinct as the grammar allows), cycling through the templates."""
    names = list(_templates_for(scene, False))
    rng.shuffle(names)
    out: list[str] = []
    for attempt in range(20 * n):
        caption = describe(scene, rng, template=names[attempt % len(names)])
        if caption not in out or attempt >= 10 * n:
            out.append(caption)
        if len(out) == n:
            break
    return out


def junk(rng: random.Random) -> str:
    """Ad-like web text that says nothing about the image ("buy now best price 2019")."""
    return " ".join(rng.sample(JUNK_PHRASES, rng.randint(2, 4)))


def swap_attribute(scene: Scene, attribute: str, rng: random.Random) -> Scene:
    """The scene with one shape's colour, kind or position changed to one no other shape has."""
    field_name, used = {
        "color": ("color", {t.color for t in scene.shapes}),
        "shape": ("kind", {t.kind for t in scene.shapes}),
        "position": ("position", {t.position for t in scene.shapes}),
    }.get(attribute, ("", set()))
    if not field_name:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {PARTIAL_ATTRIBUTES}")
    options = [v for v in {"color": SHAPE_COLORS, "kind": KINDS, "position": POSITIONS}[field_name] if v not in used]
    if not options:
        raise ValueError(f"no free {attribute} left to swap to in this scene")
    i = rng.randrange(len(scene.shapes))
    new = dataclasses.replace(scene.shapes[i], **{field_name: rng.choice(options)})
    return dataclasses.replace(scene, shapes=scene.shapes[:i] + (new,) + scene.shapes[i + 1 :])


def _swappable(scene: Scene) -> list[str]:
    free = {
        "color": len(SHAPE_COLORS) - len(scene.shapes),
        "shape": len(KINDS) - len(scene.shapes),
        "position": len(POSITIONS) - len(scene.shapes),
    }
    return [a for a in PARTIAL_ATTRIBUTES if free[a] > 0]


def corrupt(
    scene: Scene,
    kind: str,
    rng: random.Random,
    *,
    other: Scene | None = None,
    attribute: str | None = None,
) -> str:
    """A web-style caption for the scene with the given noise kind.

    Args:
        scene: the scene the image shows.
        kind: ``correct`` (a true caption), ``partial`` (one colour, shape or position swapped, so the caption is
            false for the scene), ``unrelated`` (a caption of ``other``) or ``junk``.
        rng: the random source.
        other: the other image's scene, required for ``unrelated``.
        attribute: for ``partial``, which attribute to swap (default: a random one that can be swapped).
    """
    if kind == "correct":
        return describe(scene, rng)
    if kind == "partial":
        attribute = attribute or rng.choice(_swappable(scene))
        return describe(swap_attribute(scene, attribute, rng), rng, positions=attribute == "position")
    if kind == "unrelated":
        if other is None:
            raise ValueError("an unrelated caption needs the other image's scene")
        return describe(other, rng)
    if kind == "junk":
        return junk(rng)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")


# ----------------------------------------------------------------------------------------------------------------------
# Reading captions back (to check web, synthetic and generated captions against a scene).


@dataclass(frozen=True)
class Mention:
    """A shape named in a caption, with what the caption says about it."""

    color: str
    kind: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption claims, as far as the grammar of this world goes."""

    mentions: tuple[Mention, ...]
    relations: tuple[tuple[int, str, int], ...]  # (mention index, "left of" | "right of" | "above" | "below", index)
    background: str | None
    count: int | None


_SIZE_LOOKUP = {w: size for size, words in SIZE_WORDS.items() for w in words}
_POSITION_LOOKUP = [(tuple(p.split()), pos) for pos, ps in POSITION_PHRASES.items() for p in ps]
_RELATION_LOOKUP = [
    (tuple(p.split()), rel)
    for rel, phrase in _RELATION_PHRASES.items()
    for p in {phrase, phrase.replace("to the", "on the")}
]


def parse_caption(text: str) -> ParsedCaption:
    """Read the claims of a caption: "<size>? <colour> <kind>" mentions, each optionally followed by a position
    ("on the left") or a relation to the next mention ("to the left of", "above"), "<colour> background", and a
    count ("two shapes", "a single"). Words outside the grammar are ignored."""
    t = tokenize(text)
    mentions: list[Mention] = []
    relations: list[tuple[int, str, int]] = []
    pending: tuple[int, str] | None = None
    background = count = None
    i = 0
    while i < len(t):
        w = t[i]
        if w in BACKGROUNDS or w == "grey":
            if i + 1 < len(t) and t[i + 1] == "background":
                background = "gray" if w == "grey" else w
        elif w in COUNT_WORDS and i + 1 < len(t) and t[i + 1] in ("shape", "shapes"):
            count = COUNT_WORDS.index(w)
        elif w == "single":
            count = 1
        elif w in SHAPE_COLORS and i + 1 < len(t) and t[i + 1] in KINDS:
            size = _SIZE_LOOKUP.get(t[i - 1]) if i > 0 else None
            if pending is not None:
                relations.append((pending[0], pending[1], len(mentions)))
                pending = None
            j, position = i + 2, None
            for words, rel in _RELATION_LOOKUP:
                if tuple(t[j : j + len(words)]) == words:
                    pending, j = (len(mentions), rel), j + len(words)
                    break
            else:
                for words, pos in _POSITION_LOOKUP:
                    if tuple(t[j : j + len(words)]) == words:
                        position, j = pos, j + len(words)
                        break
            mentions.append(Mention(w, t[i + 1], size, position))
            i = j
            continue
        i += 1
    return ParsedCaption(tuple(mentions), tuple(relations), background, count)


def caption_errors(scene: Scene, text: str) -> list[str]:
    """The claims of a caption that are false for the scene (empty: the caption is true).

    A caption that names no shape is an error ("no shape mentioned"); a mention of a colour-kind pair the scene lacks
    is one error, and claims about that mention (its size, position, relations) are not checked further.
    """
    parsed = parse_caption(text)
    errors = [] if parsed.mentions else ["no shape mentioned"]
    found: list[Shape | None] = []
    for m in parsed.mentions:
        s = scene.find(kind=m.kind, color=m.color)
        found.append(s)
        if s is None:
            errors.append(f"no {m.color} {m.kind}")
            continue
        if m.size is not None and m.size != s.size:
            errors.append(f"the {m.color} {m.kind} is {s.size}, not {m.size}")
        if m.position is not None and m.position != s.position:
            errors.append(f"the {m.color} {m.kind} is at {s.position}, not {m.position}")
    for a, rel, b in parsed.relations:
        sa, sb = found[a], found[b]
        if sa is not None and sb is not None and not _relation_holds(sa, rel, sb):
            errors.append(f"the {sa.color} {sa.kind} is not {rel} the {sb.color} {sb.kind}")
    if parsed.background is not None and parsed.background != scene.background:
        errors.append(f"the background is {scene.background}, not {parsed.background}")
    if parsed.count is not None and parsed.count != len(scene.shapes):
        errors.append(f"there are {len(scene.shapes)} shapes, not {parsed.count}")
    return errors


def check_caption(scene: Scene, text: str) -> bool:
    """Whether a caption names at least one shape and everything it says is true of the scene."""
    return not caption_errors(scene, text)


# ----------------------------------------------------------------------------------------------------------------------
# Questions and answers.


def _human_answers(answer: str, group: str, rng: random.Random, noise: float) -> tuple[str, ...]:
    """10 annotator answers: mostly the canonical one, a few synonyms or mistakes (never more than 4 of 10)."""
    answers = [answer] * 10
    n_off = min(4, sum(rng.random() < noise for _ in range(10)))
    for slot in rng.sample(range(10), n_off):
        if answer in ANSWER_SYNONYMS and rng.random() < 0.5:
            answers[slot] = ANSWER_SYNONYMS[answer]
        else:
            answers[slot] = rng.choice([a for a in _ANSWER_GROUPS[group] if a != answer])
    return tuple(answers)


def _candidate_questions(scene: Scene, rng: random.Random) -> dict[str, list[tuple[str, str, str]]]:
    """Per question type, the (question, answer, answer group) pairs that can be asked about this scene."""
    absent_kinds = [k for k in KINDS if scene.find(kind=k) is None]
    c: dict[str, list[tuple[str, str, str]]] = {
        "what color is the": [(f"what color is the {s.kind}?", s.color, "color") for s in scene.shapes],
        "what shape is": [(f"what shape is {s.color}?", s.kind, "shape") for s in scene.shapes],
        "where is the": [(f"where is the {s.kind}?", s.position, "position") for s in scene.shapes],
        "what size is the": [(f"what size is the {s.kind}?", s.size, "size") for s in scene.shapes],
        "how many": [("how many shapes are there?", str(len(scene.shapes)), "number")],
        "what color is the background": [("what color is the background?", scene.background, "background")],
        "is there a": [],
    }
    present = rng.choice(scene.shapes)
    if absent_kinds and rng.random() < 0.5:
        c["is there a"].append((f"is there a {rng.choice(absent_kinds)}?", "no", "yes/no"))
    else:
        c["is there a"].append((f"is there a {present.kind}?", "yes", "yes/no"))
    # A colour-kind pair: the true one, or the right kind with a wrong colour (a hard negative).
    s = rng.choice(scene.shapes)
    if rng.random() < 0.5:
        c["is there a"].append((f"is there {_article(s.color)} {s.color} {s.kind}?", "yes", "yes/no"))
    else:
        wrong = rng.choice([col for col in SHAPE_COLORS if col != s.color])
        c["is there a"].append((f"is there {_article(wrong)} {wrong} {s.kind}?", "no", "yes/no"))
    return c


def questions(scene: Scene, rng: random.Random, n: int = 5, *, human_noise: float = 0.2) -> list[QA]:
    """n distinct questions about the scene, spread over question types, with answers and 10 human answers."""
    candidates = _candidate_questions(scene, rng)
    types = [t for t in candidates if candidates[t]]
    rng.shuffle(types)
    for t in types:
        rng.shuffle(candidates[t])
    out: list[QA] = []
    while len(out) < n and any(candidates[t] for t in types):
        for t in types:
            if candidates[t] and len(out) < n:
                question, answer, group = candidates[t].pop()
                answer_type = group if group in ("yes/no", "number") else "other"
                out.append(QA(question, answer, _human_answers(answer, group, rng, human_noise), answer_type, t))
    return out


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official VQA accuracy of one exact-match prediction: mean over leave-one-out of min(1, matches / 3)
    (`blip.evaluation.vqa_question_accuracy` without the official answer normalisation: the shapes world's answers
    are already canonical words)."""
    return vqa_question_accuracy(prediction, human_answers, normalize=False)


# ----------------------------------------------------------------------------------------------------------------------
# Rows: everything about one image, a pure function of (seed, split, index).


def _rng(seed: int, split: str, index: int, purpose: str) -> random.Random:
    return random.Random(f"blip.shapes/{seed}/{split}/{index}/{purpose}")


def scene_for(split: str, index: int, *, seed: int = 0, cfg: ShapesConfig = ShapesConfig()) -> Scene:
    """The scene of image ``index`` of ``split``."""
    return sample_scene(_rng(seed, split, index, "scene"), cfg)


def image_path(split: str, index: int) -> str:
    """Where an image lives, relative to the dataset folder."""
    return f"images/{split}/{index:06d}.png"


@dataclass(frozen=True)
class Example:
    """One image of a split: its scene and the manifest rows it contributes (``rows[manifest] -> list of rows``)."""

    split: str
    index: int
    scene: Scene
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def image(self) -> str:
        return image_path(self.split, self.index)


def _unrelated_source(index: int, rng: random.Random) -> int:
    """Another image of the web split: an earlier one when there are enough, else one of the first 64."""
    if index >= 16:
        return rng.randrange(index)
    return rng.choice([j for j in range(64) if j != index])


def _qa_rows(split: str, index: int, scene: Scene, rng: random.Random, cfg: ShapesConfig) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{split}-{index:06d}-{k}",
            "question_id": index * 100 + k,
            "image_id": index,
            "image": image_path(split, index),
            "question": qa.question,
            "answer": qa.answer,
            "answers": list(qa.answers),
            "answer_type": qa.answer_type,
            "question_type": qa.question_type,
        }
        for k, qa in enumerate(questions(scene, rng, cfg.questions_per_image, human_noise=cfg.human_noise))
    ]


def make_example(split: str, index: int, *, seed: int = 0, cfg: ShapesConfig = ShapesConfig()) -> Example:
    """Regenerate one image's scene and manifest rows exactly as `generate` writes them (render the image with
    ``render(example.scene, cfg)``).

    ``clean`` -> rows["clean"]; ``test`` -> rows["test"] and rows["vqa_test"]; ``vqa`` -> rows["vqa"];
    ``web`` -> rows["web"].
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    scene = scene_for(split, index, seed=seed, cfg=cfg)
    ident, image = f"{split}-{index:06d}", image_path(split, index)
    rows: dict[str, list[dict[str, Any]]] = {}
    if split in ("clean", "test"):
        caps = references(scene, _rng(seed, split, index, "text"), cfg.n_references)
        rows[split] = [{"id": ident, "image": image, "captions": caps, "scene": scene.to_dict()}]
    if split in ("vqa", "test"):
        name = "vqa" if split == "vqa" else "vqa_test"
        rows[name] = _qa_rows(split, index, scene, _rng(seed, split, index, "qa"), cfg)
    if split == "web":
        rng = _rng(seed, split, index, "text")
        noise = rng.choices(NOISE_KINDS, weights=cfg.noise_rates)[0]
        detail: str | None = None
        source: str | None = None
        if noise == "partial":
            detail = rng.choice(_swappable(scene))
            caption = corrupt(scene, noise, rng, attribute=detail)
        elif noise == "unrelated":
            for _ in range(50):  # another image's caption that happens to be true here is no noise: draw again
                j = _unrelated_source(index, rng)
                caption = corrupt(scene, noise, rng, other=scene_for(split, j, seed=seed, cfg=cfg))
                if not check_caption(scene, caption):
                    break
            source = f"{split}-{j:06d}"
        else:
            caption = corrupt(scene, noise, rng)
        rows["web"] = [
            {
                "id": ident,
                "image": image,
                "caption": caption,
                "noise": noise,
                "noise_detail": detail,
                "source": source,
                "scene": scene.to_dict(),
            }
        ]
    return Example(split, index, scene, rows)


# ----------------------------------------------------------------------------------------------------------------------
# Writing datasets.

_MANIFESTS = {"clean": "clean.jsonl", "web": "web.jsonl", "vqa": "vqa.jsonl", "test": "test.jsonl"}
_MANIFESTS["vqa_test"] = "vqa_test.jsonl"
_JSON_FILES = (
    "answer_list.json",
    "dataset_shapes.json",
    "captions_test_coco.json",
    "vqa_test_questions.json",
    "vqa_test_annotations.json",
)
_TAR_RE = re.compile(r"^web-\d{6}\.tar$")


def _write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, fsync=False)  # thousands of small files: durability is not worth an fsync each


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A reproducible tar (fixed mtime, owner and mode) of the given (name, data) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _run_chunk(task: tuple[str, int, int, int, ShapesConfig, str, int | None]) -> tuple[str, int, list[Example]]:
    """Make images start..stop of a split (skipping PNGs already there), plus their WebDataset shard if asked."""
    split, start, stop, seed, cfg, out_dir, shard = task
    out = Path(out_dir)
    examples = []
    members: list[tuple[str, bytes]] = []
    shard_path = out / f"web-{shard:06d}.tar" if shard is not None else None
    need_shard = shard_path is not None and not shard_path.exists()
    for index in range(start, stop):
        ex = make_example(split, index, seed=seed, cfg=cfg)
        examples.append(ex)
        path = out / ex.image
        if path.exists():
            data = path.read_bytes() if need_shard else b""
        else:
            data = _png_bytes(render(ex.scene, cfg))
            _write(path, data)
        if need_shard:
            row = ex.rows["web"][0]
            key = f"{index:06d}"
            members += [
                (f"{key}.png", data),
                (f"{key}.txt", row["caption"].encode()),
                (f"{key}.json", json_bytes(row)),
            ]
    if need_shard and shard_path is not None:
        _write(shard_path, _tar_bytes(members))
    return split, start, examples


def _check_folder(out: Path, args: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix datasets: a non-empty folder must hold a dataset made with the same arguments."""
    if not out.exists() or not any(out.iterdir()):
        return
    if overwrite:
        shutil.rmtree(out / "images", ignore_errors=True)
        for p in out.iterdir():
            if p.name in _MANIFESTS.values() or p.name in _JSON_FILES or p.name == "meta.json" or _TAR_RE.match(p.name):
                p.unlink()
        return
    meta_path = out / "meta.json"
    if not meta_path.exists():
        raise FileExistsError(
            f"{out} is not empty and holds no shapes dataset (no meta.json); choose an empty folder "
            "or pass overwrite=True (--overwrite) to write into it anyway"
        )
    old = json.loads(meta_path.read_text()).get("args", {})
    if old != args:
        diff = sorted(k for k in set(old) | set(args) if old.get(k) != args.get(k))
        raise FileExistsError(
            f"{out} holds a shapes dataset made with different arguments (differing: {', '.join(diff)}); "
            "pass overwrite=True (--overwrite) to replace it, or choose another folder"
        )


def _karpathy(clean: list[Example], test: list[Example]) -> dict[str, Any]:
    images, sentid = [], 0
    for imgid, (ex, split) in enumerate([(e, "train") for e in clean] + [(e, "test") for e in test]):
        caps = ex.rows[ex.split][0]["captions"]
        sentences = [
            {"tokens": tokenize(c), "raw": c, "imgid": imgid, "sentid": sentid + k} for k, c in enumerate(caps)
        ]
        images.append(
            {
                "filepath": f"images/{ex.split}",
                "filename": f"{ex.index:06d}.png",
                "imgid": imgid,
                "split": split,
                "id": ex.rows[ex.split][0]["id"],
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
        sentid += len(caps)
    return {"dataset": "shapes", "images": images}


def _coco_captions(test: list[Example], cfg: ShapesConfig) -> dict[str, Any]:
    images, annotations = [], []
    for ex in test:
        images.append({"id": ex.index, "file_name": ex.image, "width": cfg.image_size, "height": cfg.image_size})
        for c in ex.rows["test"][0]["captions"]:
            annotations.append({"image_id": ex.index, "id": len(annotations), "caption": c})
    info = {"description": "shapes world test split captions", "version": str(FORMAT_VERSION)}
    return {"info": info, "licenses": [], "type": "captions", "images": images, "annotations": annotations}


def _vqa_pair(test: list[Example]) -> tuple[dict[str, Any], dict[str, Any]]:
    rows = [r for ex in test for r in ex.rows["vqa_test"]]
    common = {"info": {"description": "shapes world VQA test"}, "license": {}, "data_type": "shapes"}
    qs = {
        **common,
        "task_type": "Open-Ended",
        "data_subtype": "test",
        "questions": [
            {"image_id": r["image_id"], "question": r["question"], "question_id": r["question_id"]} for r in rows
        ],
    }
    anns = {
        **common,
        "data_subtype": "test",
        "annotations": [
            {
                "question_id": r["question_id"],
                "image_id": r["image_id"],
                "question_type": r["question_type"],
                "answer_type": r["answer_type"],
                "multiple_choice_answer": r["answer"],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(r["answers"])
                ],
            }
            for r in rows
        ],
    }
    return qs, anns


def generate(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_clean: int = 2000,
    n_web: int = 20000,
    n_vqa: int = 2000,
    n_test: int = 500,
    cfg: ShapesConfig = ShapesConfig(),
    webdataset: bool = False,
    shard_size: int = 1000,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a shapes dataset to ``out_dir`` (layout in the module docstring) and return its ``meta.json`` content.

    Re-running with the same arguments skips images (and shards) already written and rewrites the manifests; a
    non-empty folder made with other arguments (or not a shapes dataset) is refused with `FileExistsError` unless
    ``overwrite`` is set, which first deletes this generator's outputs there. Output is identical for any
    ``workers``.
    """
    counts = {"clean": n_clean, "web": n_web, "vqa": n_vqa, "test": n_test}
    if any(n < 0 for n in counts.values()) or shard_size < 1 or workers < 1:
        raise ValueError("counts must be >= 0, shard_size and workers >= 1")
    out = Path(out_dir)
    args = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        **{f"n_{k}": v for k, v in counts.items()},
        "cfg": dataclasses.asdict(cfg),
        "webdataset": webdataset,
        "shard_size": shard_size,
    }
    args = json.loads(json.dumps(args))  # tuples -> lists, as read back from meta.json
    _check_folder(out, args, overwrite)
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"generator": "blip.data.shapes", "seed": seed, "args": args, "complete": False}
    _write(out / "meta.json", json_bytes(meta))

    tasks = []
    for split, n in counts.items():
        step = shard_size if (split == "web" and webdataset) else 250
        for start in range(0, n, step):
            shard = start // shard_size if (split == "web" and webdataset) else None
            tasks.append((split, start, min(n, start + step), seed, cfg, str(out), shard))
    t0 = time.perf_counter()
    examples: dict[str, list[Example]] = {split: [] for split in SPLITS}
    with tqdm(total=sum(counts.values()), desc="shapes", unit="img", disable=not progress) as bar:
        if workers > 1 and len(tasks) > 1:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(min(workers, len(tasks))) as pool:
                for split, _, chunk in pool.imap(_run_chunk, tasks):
                    examples[split] += chunk
                    bar.update(len(chunk))
        else:
            for task in tasks:
                split, _, chunk = _run_chunk(task)
                examples[split] += chunk
                bar.update(len(chunk))
    elapsed = time.perf_counter() - t0

    manifests: dict[str, list[dict[str, Any]]] = {name: [] for name in _MANIFESTS}
    for split in SPLITS:
        for ex in examples[split]:
            for name, rows in ex.rows.items():
                manifests[name] += rows
    for name, file in _MANIFESTS.items():
        _write(out / file, jsonl_bytes(manifests[name]))
    _write(out / "answer_list.json", json_bytes(list(ANSWER_LIST)))
    _write(out / "dataset_shapes.json", json_bytes(_karpathy(examples["clean"], examples["test"])))
    _write(out / "captions_test_coco.json", json_bytes(_coco_captions(examples["test"], cfg)))
    qs, anns = _vqa_pair(examples["test"])
    _write(out / "vqa_test_questions.json", json_bytes(qs))
    _write(out / "vqa_test_annotations.json", json_bytes(anns))

    shards = sorted(p.name for p in out.iterdir() if _TAR_RE.match(p.name)) if webdataset else []
    web_rows = manifests["web"]
    meta.update(
        {
            "complete": True,
            "counts": {
                "images": counts,
                "clean_captions": sum(len(r["captions"]) for r in manifests["clean"]),
                "test_captions": sum(len(r["captions"]) for r in manifests["test"]),
                "vqa_questions": len(manifests["vqa"]),
                "vqa_test_questions": len(manifests["vqa_test"]),
                "web_noise": {k: sum(r["noise"] == k for r in web_rows) for k in NOISE_KINDS},
                "web_partial": dict(sorted(Counter(r["noise_detail"] for r in web_rows if r["noise_detail"]).items())),
                "webdataset_shards": len(shards),
            },
            "noise_rates": dict(zip(NOISE_KINDS, cfg.noise_rates)),
            "vocab_size": len(vocabulary()),
            "answer_list_size": len(ANSWER_LIST),
            "files": {
                "images": "images/<split>/<index:06d>.png",
                "manifests": dict(_MANIFESTS),
                "answer_list": "answer_list.json",
                "karpathy": "dataset_shapes.json",
                "coco_captions_test": "captions_test_coco.json",
                "vqa_test_questions": "vqa_test_questions.json",
                "vqa_test_annotations": "vqa_test_annotations.json",
                "webdataset": shards,
            },
        }
    )
    _write(out / "meta.json", json_bytes(meta))
    total = sum(counts.values())
    _logger.info("shapes: %d images in %.1fs (%.0f img/s) -> %s", total, elapsed, total / max(elapsed, 1e-9), out)
    return meta


# ----------------------------------------------------------------------------------------------------------------------
# Command line: `blip data shapes ...` (also `python -m blip.data.shapes`).


def _rates(text: str) -> tuple[float, float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != len(NOISE_KINDS):
        raise argparse.ArgumentTypeError(f"expected {len(NOISE_KINDS)} comma-separated rates {NOISE_KINDS}")
    return tuple(parts)  # type: ignore[return-value]


def cli_main(argv: list[str] | None = None, prog: str = "blip data shapes") -> int:
    """Generate a shapes dataset from the command line. Returns the exit code (0 ok, 2 refused folder)."""
    p = argparse.ArgumentParser(prog=prog, description="Generate the synthetic shapes image-text dataset.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-web", type=int, default=20000, help="noisy web images (one caption each)")
    p.add_argument("--n-clean", type=int, default=2000, help="clean images (5 reference captions each)")
    p.add_argument("--n-vqa", type=int, default=2000, help="VQA images (several questions each)")
    p.add_argument("--n-test", type=int, default=500, help="test images (5 references and questions each)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-shapes", type=int, default=3)
    p.add_argument(
        "--noise-rates", type=_rates, default=ShapesConfig.noise_rates, help="correct,partial,unrelated,junk"
    )
    p.add_argument("--no-texture", action="store_true", help="no texture noise")
    p.add_argument("--webdataset", action="store_true", help="also write WebDataset shards of the web split")
    p.add_argument("--shard-size", type=int, default=1000, help="rows per WebDataset shard")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset made with other arguments")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        cfg = ShapesConfig(
            image_size=a.image_size, max_shapes=a.max_shapes, noise_rates=a.noise_rates, texture=not a.no_texture
        )
    except ValueError as e:
        p.error(str(e))
    t0 = time.perf_counter()
    try:
        meta = generate(
            a.out,
            seed=a.seed,
            n_clean=a.n_clean,
            n_web=a.n_web,
            n_vqa=a.n_vqa,
            n_test=a.n_test,
            cfg=cfg,
            webdataset=a.webdataset,
            shard_size=a.shard_size,
            workers=a.workers,
            progress=not a.quiet,
            overwrite=a.overwrite,
        )
    except (FileExistsError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    c = meta["counts"]
    print(
        f"wrote {sum(c['images'].values())} images to {a.out} in {time.perf_counter() - t0:.1f}s: "
        f"{json.dumps(c['images'])}; web noise {json.dumps(c['web_noise'])}; "
        f"{c['vqa_questions']} + {c['vqa_test_questions']} questions; vocabulary {meta['vocab_size']} words"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main())
