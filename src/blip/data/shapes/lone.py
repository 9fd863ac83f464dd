"""The shapes world's ImageNet: images of one shape each, labelled with what it is and where it is, to pretrain the
image encoder on before BLIP's pretraining starts (`blip.train.vision`), as the paper starts from an ImageNet-trained
ViT. Images are a pure function of (seed, part, index) and share no random stream with the dataset's splits."""

from __future__ import annotations

import dataclasses
import random

from PIL import Image

from blip.data.shapes.drawing import render
from blip.data.shapes.scene import KINDS, POSITIONS, ShapesConfig, sample_scene

# What each label column of `lone_shapes` names, and its classes in index order.
LONE_SHAPE_LABELS: dict[str, tuple[str, ...]] = {"kind": KINDS, "position": tuple(POSITIONS)}


def lone_shapes(
    n: int, *, seed: int = 0, part: str = "train", cfg: ShapesConfig = ShapesConfig()
) -> tuple[list[Image.Image], list[tuple[int, ...]]]:
    """`n` images of one shape each (any colour, size, position and background of `cfg`'s world) and per image the
    index of its kind and of its position (`LONE_SHAPE_LABELS`). `part` names an independent set ("train", "test")."""
    one = dataclasses.replace(cfg, min_shapes=1, max_shapes=1)
    images, labels = [], []
    for index in range(n):
        scene = sample_scene(random.Random(f"blip.shapes.lone/{seed}/{part}/{index}"), one)
        shape = scene.shapes[0]
        images.append(render(scene, one))
        labels.append((KINDS.index(shape.kind), LONE_SHAPE_LABELS["position"].index(shape.position)))
    return images, labels
