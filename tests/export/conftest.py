"""Fixtures of the export tests: transformers-made tiny checkpoints of each kind, loaded and exported once."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import blip
from oracle import TinySpec

# eos_bias below the oracle's default, so generations end at different lengths and beams disagree
SPECS = {
    "caption": TinySpec(kind="caption", seed=201, eos_bias=1.5),
    "vqa": TinySpec(kind="vqa", seed=202, eos_bias=1.0),
    "retrieval": TinySpec(kind="retrieval", seed=203),
}


@pytest.fixture(scope="session")
def export_models(hf_checkpoints):
    """kind -> loaded `Blip` (float32, CPU)."""
    cache: dict[str, blip.Blip] = {}

    def get(kind: str) -> blip.Blip:
        if kind not in cache:
            cache[kind] = blip.load(hf_checkpoints(SPECS[kind]))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def onnx_exports(export_models, tmp_path_factory):
    """(kind, dtype) -> the folder `blip.export.export` wrote for that kind's model."""
    from blip.export import export

    made = {}

    def get(kind: str, dtype: str = "float32"):
        if (kind, dtype) not in made:
            folder = tmp_path_factory.mktemp(f"onnx_{kind}_{dtype}")
            export(export_models(kind), folder, dtype=dtype)
            made[kind, dtype] = folder
        return made[kind, dtype]

    return get


@pytest.fixture(scope="session")
def images():
    """Five random images of different sizes (one grey, one with transparency)."""
    rng = np.random.default_rng(7)
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 50), (32, 32), (64, 20))]
    out.append(Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)))
    out.append(Image.fromarray(rng.integers(0, 256, (36, 28, 4), dtype=np.uint8)))
    return out
