"""Our training checkpoints go through the one load path: parts chosen by kind, position embeddings resized, tied
LM head, no aliasing between parts that shared tensors in training, inference config; `Blip.from_model` wraps a
model in memory; training's `init=` starts from the same path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import blip
from blip.config import get_preset
from blip.data.vocab import config_for, shapes_tokenizer
from blip.models.blip import BlipModel
from blip.models.init import init_weights
from blip.models.vit import resize_pos_embed
from blip.train.modeling import tie_text_layers
from blip.weights.checkpoint import FORMAT, VERSION, atomic_save, config_to_dict, tokenizer_to_dict
from blip.weights.load import CheckpointError, model_for_kind


def _pretrain(text_width: int = 64, dropout: float = 0.0) -> BlipModel:
    torch.manual_seed(0)
    config = config_for(shapes_tokenizer(), get_preset("blip_test"))
    text = dataclasses.replace(config.text, hidden_size=text_width, num_attention_heads=2, hidden_dropout_prob=dropout)
    model = BlipModel(config.replace(text=text))
    init_weights(model)
    tie_text_layers(model)
    return model


def _save(model: BlipModel, path: Path) -> Path:
    atomic_save(
        {
            "format": FORMAT,
            "version": VERSION,
            "model": model.state_dict(),
            "model_config": config_to_dict(model.config),
            "tokenizer": tokenizer_to_dict(shapes_tokenizer()),
            "optimizer": {"state": {}},
            "step": 3,
        },
        path,
    )
    return path


def test_a_training_checkpoint_loads_whole_with_its_tokenizer_and_no_aliasing(tmp_path):
    model = _pretrain(dropout=0.1)
    loaded = blip.load(_save(model, tmp_path / "checkpoint.pt"))
    assert loaded.report.layout == FORMAT and loaded.config.kind == "pretrain"
    assert loaded.config.text.hidden_dropout_prob == 0.0 and not loaded.model.training
    assert loaded.tokenizer.encode("a red circle") == shapes_tokenizer().encode("a red circle")
    source = model.state_dict()
    pointers: dict[int, str] = {}
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, source[key]), key
        if key != "text_decoder.cls.predictions.decoder.weight":  # the LM head is tied to the word embeddings
            assert pointers.setdefault(value.data_ptr(), key) == key, f"{key} shares storage with another part"
    decoder = loaded.model.text_decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("kind", ["caption", "vqa", "retrieval"])
def test_parts_of_a_pretrain_checkpoint_by_kind(tmp_path, kind):
    model = _pretrain()
    loaded = blip.load(_save(model, tmp_path / "checkpoint.pt"), kind=kind)
    in_memory = model_for_kind(model, kind)
    assert loaded.config.kind == kind == in_memory.config.kind
    ours = loaded.model.state_dict()
    assert set(ours) == set(in_memory.state_dict())
    for key, value in in_memory.state_dict().items():
        assert torch.equal(ours[key], value), key
    dropped = set(loaded.report.dropped_keys)
    assert ("itm_head.weight" in dropped) == (kind != "retrieval")
    assert any(k.startswith("text_encoder.") for k in dropped) == (kind == "caption")


def test_a_vqa_model_from_a_pretrain_checkpoint_of_other_widths_starts_its_cross_kv_fresh(tmp_path, caplog):
    model = _pretrain(text_width=32)  # the answer decoder reads 32-wide question states, not 64-wide image tokens
    loaded = blip.load(_save(model, tmp_path / "checkpoint.pt"), kind="vqa")
    fresh = loaded.report.fresh_keys
    assert fresh and all(".crossattention.self.key." in k or ".crossattention.self.value." in k for k in fresh)
    assert "start fresh" in caplog.text
    source = model.state_dict()
    for key, value in loaded.model.state_dict().items():
        if key in fresh:
            assert value.shape == (32, 32) or value.shape == (32,)
        else:
            assert torch.equal(value, source[key]), key
    assert blip.load(_save(model, tmp_path / "again.pt"), kind="vqa").report.fresh_keys == fresh


def test_a_part_the_checkpoint_lacks_is_an_error_naming_both_kinds(tmp_path):
    caption = model_for_kind(_pretrain(), "caption")
    path = _save(caption, tmp_path / "caption.pt")
    with pytest.raises(CheckpointError, match="a 'retrieval' model cannot be made from a 'caption' model"):
        blip.load(path, kind="retrieval")


def test_image_size_resizes_the_position_embeddings_once(tmp_path):
    model = _pretrain()
    loaded = blip.load(_save(model, tmp_path / "checkpoint.pt"), kind="caption", image_size=48)
    assert loaded.config.vision.image_size == 48 and loaded.transform.image_size == 48
    assert loaded.report.resized_position_embedding == (16, 36)
    expected = resize_pos_embed(model.vision_model.embeddings.position_embedding.detach(), 6)
    assert torch.equal(loaded.model.vision_model.embeddings.position_embedding, expected)
    with pytest.raises(CheckpointError, match="patch_size = 8 does not divide vision_config.image_size = 50"):
        blip.load(tmp_path / "checkpoint.pt", image_size=50)


def test_from_model_wraps_its_own_inference_copy():
    model = _pretrain(dropout=0.2).train()
    wrapped = blip.Blip.from_model(model, shapes_tokenizer(), source="run", batch_size=4)
    assert wrapped.config.text.hidden_dropout_prob == 0.0 and not wrapped.model.training
    assert wrapped.batch_size == 4 and wrapped.transform.image_size == model.config.vision.image_size
    for key, value in model.state_dict().items():
        assert torch.equal(wrapped.model.state_dict()[key], value), key
    with torch.no_grad():
        model.vision_model.embeddings.class_embedding.add_(1.0)
    assert not torch.equal(
        wrapped.model.vision_model.embeddings.class_embedding, model.vision_model.embeddings.class_embedding
    )


def test_training_init_starts_from_the_one_load_path(tmp_path):
    from blip.train.config import TrainConfig
    from blip.train.modeling import build_model

    model = _pretrain()
    path = _save(model, tmp_path / "checkpoint.pt")
    started, tokenizer = build_model(TrainConfig(task="caption", init=str(path), image_size=48, dropout=0.1))
    assert started.config.kind == "caption" and started.config.vision.image_size == 48
    assert started.config.text.hidden_dropout_prob == 0.1
    assert tokenizer.vocab_size == shapes_tokenizer().vocab_size
    reference = blip.load(path, kind="caption", image_size=48).model.state_dict()
    for key, value in started.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_init_at_default_dropout_trains_every_weight(tmp_path):
    """`blip.load` packs a CPU model's linears for inference (frozen oneDNN layouts); a training run started from
    that load at the default dropout (0, the inference config's own) must still get plain, trainable weights."""
    from blip.train.config import TrainConfig
    from blip.train.modeling import build_model

    path = _save(_pretrain(), tmp_path / "checkpoint.pt")
    started, _ = build_model(TrainConfig(task="caption", init=str(path), image_size=48))
    packed = [name for name, p in started.named_parameters() if p.is_mkldnn]
    assert not packed, f"packed weights in a training model: {packed[:3]}"
    frozen = [name for name, p in started.named_parameters() if not p.requires_grad]
    assert not frozen, f"weights that would not train: {frozen[:3]}"
