"""Tiny models for the loss tests (the blip_test preset over the shapes vocabulary)."""

from __future__ import annotations

import pytest
import torch

from blip.config import get_preset
from blip.data.vocab import config_for, shapes_tokenizer
from blip.models.blip import BlipModel
from blip.models.init import init_weights


@pytest.fixture(scope="session")
def tokenizer():
    return shapes_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    def make(kind: str = "pretrain", seed: int = 0) -> BlipModel:
        torch.manual_seed(seed)
        model = BlipModel(config_for(tokenizer, get_preset("blip_test", kind=kind)))
        init_weights(model)
        return model

    return make


@pytest.fixture
def text_batch(tokenizer):
    texts = ["a red circle on the left", "a blue square", "two shapes: a green star and a pink diamond", "a circle"]
    return tokenizer(texts, max_length=30)
