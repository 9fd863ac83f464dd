"""An NLVR2 analogue in the shapes world: two images, one statement about both, true or false.

Each example is a pair of independent scenes (the left and the right image) and a `Claim` about them, said in the
shapes vocabulary (no new words, so the pretrained shapes tokenizer and model read it), e.g.

    has    "a red circle is in the left picture"                       the left image has a red circle
    both   "a star is in the left picture and in the right picture"     both images have a star
    only   "a blue shape is in the right picture and no blue shape is in the left picture"
    count  "there are two shapes in the right picture"

"left"/"right" name the images only ("the left picture", as NLVR2 says "the left image"; the shapes captions' "on
the left" is a position inside an image, which no statement talks about), so NLVR2's augmentation (swap the images
and the words left/right) keeps every label (`Claim.swapped`). Labels are balanced:
each example draws its label first, then a claim of a random template that has it; false claims mostly name
things the other image has, so a model must tell the images apart. Everything is a pure function of
``(seed, split, index)``.

On disk (`generate_nlvr`), in the shapes world's formats::

    images/nlvr_<split>/<index:06d>-a.png, -b.png       the left and the right image
    nlvr_<split>.jsonl    {"id", "image_a", "image_b", "statement", "label": bool, "template", "scene_a", "scene_b"}
                          (the columns `blip batch reason` and `blip train` task=nlvr read)
    nlvr_<split>.json     NLVR2's own format: [{"identifier", "images": [a, b], "sentence", "label": "True"|"False"}]
    nlvr_meta.json        seed, counts, label balance, what the images were drawn with, complete
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from blip.data.shapes.drawing import render
from blip.data.shapes.scene import KINDS, SHAPE_COLORS, Scene, ShapesConfig, sample_scene
from blip.data.shapes.words import COUNT_WORDS, article
from blip.io import atomic_write_bytes, json_bytes, jsonl_bytes

NLVR_SPLITS = ("train", "test")
TEMPLATES = ("has", "both", "only", "count")
SIDES = ("left", "right")
NLVR_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Claim:
    """A statement about an image pair. `side`: "left" (image a) or "right" (image b); unused fields are None."""

    template: str  # one of TEMPLATES
    side: str | None = None
    kind: str | None = None
    color: str | None = None
    count: int | None = None

    def text(self) -> str:
        other = None if self.side is None else SIDES[1 - SIDES.index(self.side)]
        noun = f"{self.color + ' ' if self.color else ''}{self.kind or 'shape'}"
        a = article(noun)
        if self.template == "has":
            return f"{a} {noun} is in the {self.side} picture"
        if self.template == "both":
            return f"{a} {noun} is in the left picture and in the right picture"
        if self.template == "only":
            return f"{a} {noun} is in the {self.side} picture and no {noun} is in the {other} picture"
        if self.template == "count":
            if self.count == 1:
                return f"there is one shape in the {self.side} picture"
            return f"there are {COUNT_WORDS[self.count]} shapes in the {self.side} picture"
        raise ValueError(f"unknown template {self.template!r}")

    def holds(self, left: Scene, right: Scene) -> bool:
        scenes = {"left": left, "right": right}

        def has(scene: Scene) -> bool:
            return scene.find(kind=self.kind, color=self.color) is not None

        if self.template == "has":
            return has(scenes[self.side])
        if self.template == "both":
            return has(left) and has(right)
        if self.template == "only":
            other = SIDES[1 - SIDES.index(self.side)]
            return has(scenes[self.side]) and not has(scenes[other])
        if self.template == "count":
            return len(scenes[self.side].shapes) == self.count
        raise ValueError(f"unknown template {self.template!r}")

    def swapped(self) -> Claim:
        """The same claim with the images swapped: `swapped().holds(b, a) == holds(a, b)`."""
        return self if self.side is None else replace(self, side=SIDES[1 - SIDES.index(self.side)])


@dataclass(frozen=True)
class NlvrExample:
    split: str
    index: int
    left: Scene
    right: Scene
    claim: Claim
    label: bool

    @property
    def statement(self) -> str:
        return self.claim.text()

    @property
    def images(self) -> tuple[str, str]:
        return nlvr_image_paths(self.split, self.index)

    def row(self) -> dict[str, Any]:
        a, b = self.images
        return {
            "id": f"nlvr-{self.split}-{self.index:06d}",
            "image_a": a,
            "image_b": b,
            "statement": self.statement,
            "label": self.label,
            "template": self.claim.template,
            "scene_a": self.left.to_dict(),
            "scene_b": self.right.to_dict(),
        }


def nlvr_image_paths(split: str, index: int) -> tuple[str, str]:
    return f"images/nlvr_{split}/{index:06d}-a.png", f"images/nlvr_{split}/{index:06d}-b.png"


def _draw_claim(template: str, left: Scene, right: Scene, rng: random.Random, cfg: ShapesConfig) -> Claim:
    """A random claim of `template`; what it names comes mostly from the pair's own shapes."""
    shapes = [s for s in left.shapes + right.shapes]
    named = rng.choice(shapes) if shapes and rng.random() < 0.8 else None
    kind = named.kind if named else rng.choice(KINDS)
    color = named.color if named else rng.choice(tuple(SHAPE_COLORS))
    side = rng.choice(SIDES)
    if template == "count":
        return Claim("count", side=side, count=rng.randint(cfg.min_shapes, cfg.max_shapes))
    if template == "only":
        return Claim("only", side=side, color=color)
    what = rng.choice(("kind", "color", "both")) if template == "has" else rng.choice(("kind", "color"))
    return Claim(
        template,
        side=side if template == "has" else None,
        kind=kind if what in ("kind", "both") else None,
        color=color if what in ("color", "both") else None,
    )


def make_nlvr_example(split: str, index: int, *, seed: int = 0, cfg: ShapesConfig = ShapesConfig()) -> NlvrExample:
    """Example `index` of `split`: its template and label are drawn first (labels balanced within every template,
    so the words alone say nothing), then a claim of that template with that label; when the pair admits none
    (e.g. "both" true for images with nothing in common), the right image is drawn again."""
    if split not in NLVR_SPLITS:
        raise ValueError(f"unknown NLVR split {split!r}; expected one of {NLVR_SPLITS}")
    key = f"blip.shapes.nlvr/{seed}/{split}/{index}"
    left = sample_scene(random.Random(f"{key}/a"), cfg)
    right_rng = random.Random(f"{key}/b")
    right = sample_scene(right_rng, cfg)
    rng = random.Random(f"{key}/claim")
    template, label = rng.choice(TEMPLATES), rng.random() < 0.5
    for attempt in range(1, 1001):
        claim = _draw_claim(template, left, right, rng, cfg)
        if claim.holds(left, right) == label:
            return NlvrExample(split, index, left, right, claim, label)
        if attempt % 20 == 0:
            right = sample_scene(right_rng, cfg)
    raise RuntimeError(f"no {label} {template!r} claim found for {key}")


def generate_nlvr(
    out: str | Path,
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_test: int = 400,
    cfg: ShapesConfig = ShapesConfig(),
) -> dict[str, Any]:
    """Write the pairs of both splits into `out` (images first, manifests last, atomically). Images already there
    are kept when nlvr_meta.json says they were drawn with the same seed and settings (an interrupted run goes on),
    else drawn again. Returns the metadata written to nlvr_meta.json."""
    from blip.data.shapes.dataset import _png_bytes

    out = Path(out)
    drawn_with = json.loads(json.dumps({"seed": seed, "cfg": dataclasses.asdict(cfg)}))  # tuples -> lists
    meta_path = out / "nlvr_meta.json"
    try:
        keep = json.loads(meta_path.read_text()).get("drawn_with") == drawn_with
    except (OSError, ValueError):
        keep = False
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(meta_path, json_bytes({"drawn_with": drawn_with, "complete": False}, indent=None))
    counts: dict[str, Any] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        examples = [make_nlvr_example(split, i, seed=seed, cfg=cfg) for i in range(n)]
        for ex in examples:
            for scene, rel in zip((ex.left, ex.right), ex.images):
                path = out / rel
                if not (keep and path.exists()):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(path, _png_bytes(render(scene, cfg)), fsync=False)
        rows = [ex.row() for ex in examples]
        atomic_write_bytes(out / f"nlvr_{split}.jsonl", jsonl_bytes(rows))
        original = [
            {"identifier": r["id"], "images": [r["image_a"], r["image_b"]], "sentence": r["statement"],
             "label": str(r["label"])}
            for r in rows
        ]  # fmt: skip
        atomic_write_bytes(out / f"nlvr_{split}.json", json_bytes(original))
        counts[split] = {
            "pairs": n,
            "true": sum(r["label"] for r in rows),
            "templates": dict(Counter(r["template"] for r in rows)),
        }
    meta = {
        "format_version": NLVR_FORMAT_VERSION,
        "seed": seed,
        "image_size": cfg.image_size,
        "max_shapes": cfg.max_shapes,
        "counts": counts,
        "drawn_with": drawn_with,
        "complete": True,
    }
    atomic_write_bytes(meta_path, json_bytes(meta))
    return meta
