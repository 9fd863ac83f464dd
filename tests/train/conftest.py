"""Fixtures for the training tests: a tiny shapes world on disk and tiny run configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small shapes world (with WebDataset shards of the web split)."""
    from blip.data import shapes

    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(
        out, seed=0, n_clean=48, n_web=96, n_vqa=32, n_test=12, webdataset=True, shard_size=48, progress=False
    )
    return out
