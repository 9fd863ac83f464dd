"""Writing captions: true paraphrases of a scene (`describe`, `references`) and the web's noise (`corrupt`:
a swapped attribute, another image's caption, or `junk`)."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

from blip.data.shapes.parse import check_caption
from blip.data.shapes.scene import (
    BACKGROUNDS,
    KINDS,
    NOISE_KINDS,
    PARTIAL_ATTRIBUTES,
    POSITIONS,
    SHAPE_COLORS,
    Scene,
    Shape,
    relation,
)
from blip.data.shapes.words import COUNT_WORDS, JUNK_PHRASES, POSITION_PHRASES, RELATION_PHRASES, SIZE_WORDS, article

_TEMPLATES: tuple[str, ...] = ("list", "there", "count", "background", "background_first", "relation")
# Templates that can state the absolute position of every shape (used for position swaps, which must be visible).
_POSITION_TEMPLATES: tuple[str, ...] = ("list", "there", "background", "background_first")


def _noun_phrase(shape: Shape, rng: random.Random, *, single: bool = False) -> str:
    """ "a red circle", "a big red circle", "an orange star"; with single: "a single small red circle"."""
    words = [rng.choice(SIZE_WORDS[shape.size])] if rng.random() < 0.4 else []
    words += [shape.color, shape.kind]
    if single:
        return "a single " + " ".join(words)
    return f"{article(words[0])} {' '.join(words)}"


def _located(shape: Shape, rng: random.Random) -> str:
    return f"{_noun_phrase(shape, rng)} {rng.choice(POSITION_PHRASES[shape.position])}"


def _join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _templates_for(scene: Scene, positions: bool) -> tuple[str, ...]:
    if positions:
        return _POSITION_TEMPLATES
    pairs = any(relation(a, b) for a in scene.shapes for b in scene.shapes if a is not b)
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
        pairs = [(a, b) for a in shapes for b in shapes if a is not b and relation(a, b)]
        a, b = rng.choice(pairs)
        text = f"{_noun_phrase(a, rng)} {RELATION_PHRASES[relation(a, b)]} {_noun_phrase(b, rng)}"  # type: ignore[index]
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


def swappable_attributes(scene: Scene) -> list[str]:
    """The attributes (of PARTIAL_ATTRIBUTES) that `swap_attribute` can change: a value no shape has is left."""
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
        attribute = attribute or rng.choice(swappable_attributes(scene))
        return describe(swap_attribute(scene, attribute, rng), rng, positions=attribute == "position")
    if kind == "unrelated":
        if other is None:
            raise ValueError("an unrelated caption needs the other image's scene")
        return describe(other, rng)
    if kind == "junk":
        return junk(rng)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")


# Word-level swaps for written ITM negatives: a caption with one colour, kind, size, position, relation, count or
# background changed is false for its image (checked) yet differs from a true caption in one phrase - what the
# web's "partly wrong" captions look like, made from a true caption the way a person would spoil it.
NEGATIVE_SWAPS: dict[str, tuple[str, ...]] = {
    "color": tuple(SHAPE_COLORS),
    "shape": KINDS,
    "size": ("small", "large", "big"),
    "position": tuple(p for ps in POSITION_PHRASES.values() for p in ps),
    "relation": tuple(RELATION_PHRASES.values()),
    "count": COUNT_WORDS[2 : len(POSITIONS) + 1],  # "two shapes" -> "three shapes" ("one shapes" is no English)
    "background": tuple(f"{b} background" for b in BACKGROUNDS),
}
_ARTICLE = re.compile(r"\b(a|an) (\w+)")


def _swap_candidates(text: str) -> dict[str, list[str]]:
    """Every text made from `text` by replacing one phrase of a category by another phrase of that category."""
    out: dict[str, list[str]] = {}
    for category, phrases in NEGATIVE_SWAPS.items():
        pattern = re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)) + r")\b")
        for match in pattern.finditer(text):
            for other in phrases:
                if other == match.group(1):
                    continue
                new = text[: match.start()] + other + text[match.end() :]
                new = _ARTICLE.sub(lambda m: f"{article(m.group(2))} {m.group(2)}", new)
                out.setdefault(category, []).append(new)
    return out


def check_negative_categories(categories: Sequence[str]) -> None:
    """Raises `ValueError` naming any of `categories` that is not a category of `NEGATIVE_SWAPS`."""
    unknown = sorted(set(categories) - set(NEGATIVE_SWAPS))
    if unknown:
        raise ValueError(f"unknown negative categories {unknown}; expected some of {sorted(NEGATIVE_SWAPS)}")


def hard_negatives(
    scene: Scene, caption: str, rng: random.Random, n: int = 3, categories: Sequence[str] | None = None
) -> list[str]:
    """Up to `n` distinct captions that differ from the true `caption` of `scene` in one phrase of `categories`
    (of `NEGATIVE_SWAPS`: a colour, kind, size, position, relation, count or background; default all) and are false
    for the scene; categories drawn evenly."""
    check_negative_categories(categories or ())
    false = {
        category: sorted({t for t in texts if t != caption and not check_caption(scene, t)})
        for category, texts in _swap_candidates(caption).items()
        if categories is None or category in categories
    }
    false = {c: texts for c, texts in false.items() if texts}
    out: list[str] = []
    while false and len(out) < n:
        category = rng.choice(sorted(false))
        text = false[category].pop(rng.randrange(len(false[category])))
        if not false[category]:
            del false[category]
        if text not in out:
            out.append(text)
    return out
