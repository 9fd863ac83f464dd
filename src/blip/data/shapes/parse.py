"""Reading captions back, to check web, synthetic and generated captions against a scene."""

from __future__ import annotations

from dataclasses import dataclass

from blip.data.shapes.scene import BACKGROUNDS, KINDS, SHAPE_COLORS, Scene, Shape, relation_holds
from blip.data.shapes.words import COUNT_WORDS, POSITION_PHRASES, RELATION_PHRASES, SIZE_WORDS, tokenize


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
    for rel, phrase in RELATION_PHRASES.items()
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
        if sa is not None and sb is not None and not relation_holds(sa, rel, sb):
            errors.append(f"the {sa.color} {sa.kind} is not {rel} the {sb.color} {sb.kind}")
    if parsed.background is not None and parsed.background != scene.background:
        errors.append(f"the background is {scene.background}, not {parsed.background}")
    if parsed.count is not None and parsed.count != len(scene.shapes):
        errors.append(f"there are {len(scene.shapes)} shapes, not {parsed.count}")
    return errors


def check_caption(scene: Scene, text: str) -> bool:
    """Whether a caption names at least one shape and everything it says is true of the scene."""
    return not caption_errors(scene, text)
