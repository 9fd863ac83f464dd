"""Fixtures of the task tests: transformers-made tiny checkpoints (64 text positions), loaded once."""

from __future__ import annotations

import pytest

import blip
from oracle import TinySpec

CAPTION = TinySpec(kind="caption", seed=91)
VQA = TinySpec(kind="vqa", seed=92)


@pytest.fixture(scope="session")
def caption_dir(hf_checkpoints):
    return hf_checkpoints(CAPTION)


@pytest.fixture(scope="session")
def captioner(caption_dir) -> blip.Blip:
    return blip.load(caption_dir)


@pytest.fixture(scope="session")
def vqa_dir(hf_checkpoints):
    return hf_checkpoints(VQA)


@pytest.fixture(scope="session")
def answerer(vqa_dir) -> blip.Blip:
    return blip.load(vqa_dir)
