"""The shapes world's ImageNet: scenes labelled patch by patch with the kind, colour and place of the shape under
each patch, to pretrain the image encoder on before BLIP's pretraining starts (`blip.train.vision`), as the paper
starts from an ImageNet-trained ViT. Images are a pure function of (seed, part, index) and share no random stream
with the dataset's splits.

Labels are per patch, not per image, because the text decoder and the matching head read patch tokens: a ViT taught
to name one lone shape from its CLS token named the kind of a shape in a two-shape scene from the patch under it 50%
of the time (a linear probe; 94% after this pretraining, position 75% -> 100%).
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from blip.data.shapes.drawing import render, shape_map
from blip.data.shapes.scene import KINDS, POSITIONS, SHAPE_COLORS, Scene, ShapesConfig, sample_scene

# What each label column of `patch_labels` names, and its classes in index order; class 0: no shape there.
PATCH_LABELS: dict[str, tuple[str, ...]] = {
    "kind": ("none", *KINDS),
    "color": ("none", *SHAPE_COLORS),
    "position": ("none", *POSITIONS),
}
MIN_COVER = 0.1  # a patch names the shape covering most of it, if that shape covers at least this share of it


def patch_labels(scene: Scene, grid: int) -> list[tuple[int, int, int]]:
    """Per patch of a `grid` x `grid` split of the image (row by row): the (kind, colour, position) class indices
    (`PATCH_LABELS`) of the shape covering most of the patch, or (0, 0, 0) when none covers `MIN_COVER` of it."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    cell = max(16, 384 // grid)  # pixels per patch side in the drawn map: fine enough to measure cover
    owner = shape_map(scene, grid * cell).reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid**2, -1)
    out = []
    for pixels in owner:
        cover = np.bincount(pixels, minlength=len(scene.shapes) + 1)[1:]
        if not len(cover) or cover.max() < MIN_COVER * pixels.size:
            out.append((0, 0, 0))
            continue
        s = scene.shapes[int(cover.argmax())]
        out.append(
            tuple(PATCH_LABELS[name].index(value) for name, value in zip(PATCH_LABELS, (s.kind, s.color, s.position)))
        )
    return out  # type: ignore[return-value]


def labelled_scenes(
    n: int, *, grid: int, seed: int = 0, part: str = "train", cfg: ShapesConfig = ShapesConfig()
) -> tuple[list[Image.Image], list[list[tuple[int, int, int]]]]:
    """`n` scenes of `cfg`'s world (its shape counts, colours, sizes, backgrounds) drawn, and per image its
    `patch_labels` on a `grid` x `grid` split. `part` names an independent set ("train", "test")."""
    images, labels = [], []
    for index in range(n):
        scene = sample_scene(random.Random(f"blip.shapes.patches/{seed}/{part}/{index}"), cfg)
        images.append(render(scene, cfg))
        labels.append(patch_labels(scene, grid))
    return images, labels
