"""Fixtures for the CapFilt tests: a tiny captioner and filter (random weights, shapes vocabulary), saved as model
folders, and a small shapes world with WebDataset shards of its web split."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from capfilt_helpers import make_models  # noqa: E402


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """(captioner, filter) as `blip.Blip` objects; also saved: see `model_dirs`."""
    return make_models(tmp_path_factory.mktemp("capfilt_models"))


@pytest.fixture(scope="session")
def model_dirs(models) -> tuple[Path, Path]:
    captioner, filter_ = models
    return Path(captioner.source), Path(filter_.source)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from blip.data import shapes

    out = tmp_path_factory.mktemp("capfilt_shapes")
    shapes.generate(out, seed=0, n_clean=6, n_web=24, n_vqa=0, n_test=0, webdataset=True, shard_size=12, progress=False)
    return out
