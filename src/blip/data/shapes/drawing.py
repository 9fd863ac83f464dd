"""Drawing a scene: a pure function of (scene, config)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from blip.data.shapes.scene import BACKGROUNDS, SHAPE_COLORS, SIZES, Scene, ShapesConfig


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


def _draw_shapes(draw: ImageDraw.ImageDraw, scene: Scene, side: int, fills: Sequence[Any]) -> None:
    """Draw each shape of the scene, filled with its entry of `fills`, on a canvas of `side` pixels."""
    for s, fill in zip(scene.shapes, fills):
        x, y = s.center()
        cx, cy, r = x * side, y * side, SIZES[s.size] * side
        if s.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_outline(s.kind, cx, cy, r), fill=fill)


def render(scene: Scene, cfg: ShapesConfig = ShapesConfig()) -> Image.Image:
    """Draw a scene as an RGB image of ``cfg.image_size`` pixels. A pure function of (scene, cfg)."""
    ss = 4 if cfg.antialias else 1
    side = cfg.image_size * ss
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    _draw_shapes(ImageDraw.Draw(img), scene, side, [SHAPE_COLORS[s.color] for s in scene.shapes])
    if ss > 1:
        img = img.reduce(ss)
    if cfg.texture and cfg.texture_strength > 0:
        noise = np.random.default_rng(scene.texture_seed).normal(0.0, cfg.texture_strength, (*img.size[::-1], 1))
        pixels = np.asarray(img, dtype=np.float32) + noise
        img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return img


def shape_map(scene: Scene, side: int) -> np.ndarray:
    """`[side, side]` uint8: at each pixel 1 + the index (in `scene.shapes`) of the shape drawn there, 0 where the
    background shows. Drawn as `render` draws the shapes, at `side` pixels (no antialiasing)."""
    canvas = Image.new("L", (side, side), 0)
    _draw_shapes(ImageDraw.Draw(canvas), scene, side, range(1, len(scene.shapes) + 1))
    return np.asarray(canvas)
