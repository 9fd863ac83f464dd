"""The world: colours, shapes, sizes and positions; a scene (`Scene`) says exactly what an image shows.

`ShapesConfig` sets how images, texts and noise are generated; `sample_scene` draws a random scene.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

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


def relation(a: Shape, b: Shape) -> str | None:
    """The relation word of a to b when both sit on one row or column of slots ("left of", "above", ...)."""
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    if ay == by:
        return "left of" if ax < bx else "right of"
    if ax == bx:
        return "above" if ay < by else "below"
    return None


def relation_holds(a: Shape, rel: str, b: Shape) -> bool:
    """Whether a is `rel` ("left of", "right of", "above", "below") b."""
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]
