"""Grad-CAM points at what a word names: a retrieval model trained on the shapes world puts more of a shape word's map
on that shape than on the other shapes of the image. Slow (trains a model for about a minute or more on one core)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

import blip
from blip.data.shapes.scene import KINDS, Scene

pytestmark = pytest.mark.slow
RADIUS = 0.17  # a disc this wide (fraction of the side) around a shape centre holds the whole shape (radius <= 0.14)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from blip.data import shapes
    from blip.train.config import SHAPES_MODEL, TrainConfig
    from blip.train.recipe import run

    world = tmp_path_factory.mktemp("shapes_explain")
    shapes.generate(world, seed=4, n_clean=600, n_web=0, n_vqa=8, n_test=60, progress=False)
    out = tmp_path_factory.mktemp("explain_model")
    cfg = TrainConfig(
        task="retrieval",
        data=str(world),
        out_dir=str(out),
        eval_data=str(world),
        epochs=8,
        batch_size=16,
        lr=1e-3,
        warmup_steps=20,
        queue_size=256,
        alpha_ramp_epochs=1.0,
        threads=1,
        log_every=50,
        eval_max_images=8,
        **{**SHAPES_MODEL, "text_layers": 3},
    )
    summary = run(cfg)
    assert summary.finished
    return world, blip.load(out / "model")


def _disc(grid: int, centre: tuple[float, float]) -> np.ndarray:
    cells = (np.arange(grid) + 0.5) / grid
    x, y = np.meshgrid(cells, cells)  # x right, y down, as the scene's centres
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= RADIUS**2


def localisation(model: blip.Blip, world, layer: int | None = None) -> dict[str, float]:
    """Over the test images with two or more shapes, explain the first reference caption; for each word naming a shape
    of the scene, the map's mass in a disc around each shape. `hit_rate`: how often the named shape's disc holds more
    than every other shape's; `share`: the named shape's part of the mass on all shapes; `chance`: 1 / shapes."""
    rows = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    hits, shares, chance = [], [], []
    for row in rows:
        scene = Scene.from_dict(row["scene"])
        if len(scene.shapes) < 2:
            continue
        image = Image.open(world / row["image"]).convert("RGB")
        got = model.explain(image, row["captions"][0], layer=layer)
        for word, heat in zip(got.words, got.word_maps):
            kind = re.sub(r"[^a-z]", "", word.lower())
            shape = scene.find(kind=kind) if kind in KINDS else None
            if shape is None or heat.sum() <= 0:
                continue
            mass = {s: float(heat[_disc(got.grid, s.center())].sum()) for s in scene.shapes}
            hits.append(all(mass[shape] > mass[s] for s in scene.shapes if s != shape))
            shares.append(mass[shape] / max(sum(mass.values()), 1e-12))
            chance.append(1 / len(scene.shapes))
    return {
        "words": len(hits),
        "hit_rate": float(np.mean(hits)),
        "share": float(np.mean(shares)),
        "chance": float(np.mean(chance)),
    }


def test_a_shape_word_lights_up_its_shape(trained):
    world, model = trained
    found = localisation(model, world)
    print(f"explain on shapes: {found}")
    assert found["words"] >= 20
    assert found["hit_rate"] > found["chance"] + 0.15
