"""Fixtures for the batch-job tests: transformers-made tiny checkpoints and an image folder with bad files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from jobs_helpers import CAPTION, RETRIEVAL, VQA, make_folder  # noqa: E402


@pytest.fixture(scope="session")
def caption_model(hf_checkpoints) -> Path:
    return hf_checkpoints(CAPTION)


@pytest.fixture(scope="session")
def vqa_model(hf_checkpoints) -> Path:
    return hf_checkpoints(VQA)


@pytest.fixture(scope="session")
def retrieval_model(hf_checkpoints) -> Path:
    return hf_checkpoints(RETRIEVAL)


@pytest.fixture
def image_folder(tmp_path) -> tuple[Path, list[str], dict[str, str]]:
    root = tmp_path / "images"
    good, bad = make_folder(root)
    return root, good, bad
