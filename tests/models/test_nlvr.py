"""NLVR2: the original `model_base_nlvr.pth` layout loads strictly and our forward equals an independent plain-tensor
implementation of the original model; initialisation from any BLIP; save/load; the `reason` API."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import blip
from blip.config import BlipConfig, TextConfig, VisionConfig, get_preset
from blip.data.vocab import config_for, shapes_tokenizer
from nlvr_helpers import BASE, NlvrSizes, nlvr_shapes, reference_logits, reference_vit, write_nlvr_checkpoint
from oracle import make_images

SIZES = NlvrSizes()


def test_the_documented_layout_is_579_tensors_and_259m_parameters():
    shapes = nlvr_shapes(BASE)
    assert len(shapes) == 579
    assert sum(k.startswith("visual_encoder.") for k in shapes) == 150
    assert sum(k.startswith("text_encoder.") for k in shapes) == 425
    assert sum(k.startswith("cls_head.") for k in shapes) == 4
    params = sum(torch.Size(s).numel() for k, s in shapes.items() if not k.endswith("position_ids"))
    assert abs(params / 1e6 - 259.37) < 0.01


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return write_nlvr_checkpoint(tmp_path_factory.mktemp("nlvr_pth"), seed=3)


def _reference_scores(m: blip.Blip, state, pairs, statements, vision_heads, text_heads):
    pixels = m.transform([img for pair in pairs for img in pair])
    ids, mask = m.tokenizer(statements, max_length=64)
    ids[:, 0] = m.config.enc_token_id
    eps = m.config.vision.layer_norm_eps  # we follow transformers' 1e-5 (the original code: 1e-6), docs/architecture.md
    tokens = reference_vit(state, pixels, vision_heads, SIZES.vision_layers, eps)
    logits = reference_logits(state, ids, mask, tokens[0::2], tokens[1::2], text_heads, SIZES.text_layers)
    return logits.softmax(-1)[:, 1]


@pytest.mark.parametrize("heads", [None, (2, 4)], ids=["inferred-config", "given-config"])
def test_original_file_loads_strictly_and_matches_the_reference(original, heads):
    path, tokenizer, state = original
    config = None
    if heads is not None:
        vocab = state["text_encoder.embeddings.word_embeddings.weight"].shape[0]
        config = BlipConfig(
            VisionConfig(64, 96, 2, heads[0], image_size=32, patch_size=8),
            TextConfig(
                vocab_size=vocab,
                hidden_size=64,
                encoder_hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=4,
                num_attention_heads=heads[1],
                max_position_embeddings=64,
            ),
            "nlvr",
        )
    m = blip.load(path, tokenizer=tokenizer, config=config)
    assert m.config.kind == "nlvr" and m.report.layout == "salesforce"
    # strict: every tensor of the file (but the position-id buffer) is a parameter of the model, and nothing else
    ours = m.model.state_dict()
    assert len(ours) == len(state) - 1
    assert torch.equal(
        ours["vision_model.encoder.layers.1.self_attn.qkv.weight"], state["visual_encoder.blocks.1.attn.qkv.weight"]
    )

    images = make_images(3, seed=5)
    pairs = [(images[0], images[1]), (images[1], images[0]), (images[2], images[2])]
    statements = ["the left has a red circle", "two shapes", "a star is on the right and the left"]
    verdicts = m.reason([a for a, _ in pairs], [b for _, b in pairs], statements)
    vision_heads, text_heads = heads or (1, 1)
    expected = _reference_scores(m, state, pairs, statements, vision_heads, text_heads)
    got = torch.tensor([v.score for v in verdicts])
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    assert [v.label for v in verdicts] == [s >= 0.5 for s in expected.tolist()]
    assert len(set(round(s, 6) for s in got.tolist())) == 3  # swapping the images changes the verdict


def test_wrong_layout_is_one_clear_error(original, tmp_path):
    path, tokenizer, state = original
    broken = {k: v for k, v in state.items() if "layer.3.crossattention.output.merge_layer" not in k}
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(blip.weights.load.CheckpointError, match="missing: .*merge_layer"):
        blip.load(tmp_path / "broken.pth", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def retrieval_folder(tmp_path_factory):
    tokenizer = shapes_tokenizer()
    config = config_for(tokenizer, get_preset("blip_test").replace(kind="retrieval"))
    m = blip.create_model(config, tokenizer, seed=4)
    folder = tmp_path_factory.mktemp("retrieval")
    m.save(folder)
    return folder


def test_init_from_any_blip_copies_the_cross_attention_into_both_branches(retrieval_folder):
    source = load_file(str(retrieval_folder / "model.safetensors"))
    torch.manual_seed(0)
    m = blip.load(retrieval_folder, kind="nlvr")
    assert m.config.kind == "nlvr"
    ours = m.model.state_dict()
    layers = m.config.text.num_hidden_layers
    for i in range(layers):
        p = f"text_encoder.encoder.layer.{i}.crossattention."
        for name in ("query", "key", "value"):
            for part in ("weight", "bias"):
                single = source[f"{p}self.{name}.{part}"]
                assert torch.equal(ours[f"{p}self0.{name}.{part}"], single)
                assert torch.equal(ours[f"{p}self1.{name}.{part}"], single)
        for part in ("weight", "bias"):
            assert torch.equal(ours[f"{p}output.dense0.{part}"], source[f"{p}output.dense.{part}"])
            assert torch.equal(ours[f"{p}output.dense1.{part}"], source[f"{p}output.dense.{part}"])
            assert torch.equal(ours[f"{p}output.LayerNorm.{part}"], source[f"{p}output.LayerNorm.{part}"])
        assert (f"{p}output.merge_layer.weight" in ours) == (i >= layers // 2)
    # the branches are copies, not one tensor: fine-tuning moves them apart
    from blip.weights.load import assemble

    unpacked = assemble(source, m.config, "retrieval", "retrieval")  # the load path's steps, weights not packed
    layer0 = unpacked.text_encoder.layers[0].crossattention
    assert torch.equal(layer0.self0.query.weight, layer0.self1.query.weight)
    assert layer0.self0.query.weight.data_ptr() != layer0.self1.query.weight.data_ptr()
    fresh = set(m.report.fresh_keys)
    assert {"cls_head.0.weight", "cls_head.2.bias"} <= fresh
    assert all("merge_layer" in k or k.startswith("cls_head.") for k in fresh)
    assert ours["cls_head.0.weight"].std() > 0.005  # random, not zeros
    assert "itm_head.weight" in m.report.dropped_keys


def test_a_captioner_cannot_become_an_nlvr_model(tmp_path):
    tokenizer = shapes_tokenizer()
    config = config_for(tokenizer, get_preset("blip_test").replace(kind="caption"))
    blip.create_model(config, tokenizer).save(tmp_path)
    with pytest.raises(blip.weights.load.CheckpointError, match="no image-grounded text encoder"):
        blip.load(tmp_path, kind="nlvr")


def test_save_and_load_round_trip(original, tmp_path):
    path, tokenizer, _ = original
    m = blip.load(path, tokenizer=tokenizer)
    m.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == ["BlipForVisualReasoning"]
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(saved) == set(m.model.state_dict())
    assert "text_encoder.encoder.layer.2.crossattention.output.merge_layer.weight" in saved
    again = blip.load(tmp_path / "saved")
    assert again.config == m.config
    images = make_images(2, seed=9)
    first = m.reason(images[0], images[1], ["a red circle", "two shapes"])
    second = again.reason(images[0], images[1], ["a red circle", "two shapes"])
    assert [v.score for v in first] == [v.score for v in second]


def test_reason_pairs_up_and_encodes_each_image_once(original):
    path, tokenizer, _ = original
    m = blip.load(path, tokenizer=tokenizer, batch_size=8)
    images = make_images(3, seed=2)
    seen = []
    vit = m.model.vision_model
    original_forward = vit.forward
    vit.forward = lambda pixels: seen.append(pixels.shape[0]) or original_forward(pixels)
    try:
        verdicts = m.reason([images[0], images[1], images[0]], images[2], "a star")
    finally:
        vit.forward = original_forward
    assert seen == [3]  # three distinct images, one ViT pass
    assert len(verdicts) == 3 and all(isinstance(v, blip.Verdict) for v in verdicts)
    alone = m.reason(images[1], images[2], "a star")[0]
    assert abs(alone.score - verdicts[1].score) < 1e-5  # batching does not change a row
    assert all(v.label == (v.score >= 0.5) for v in verdicts)
    with pytest.raises(ValueError, match="same length"):
        m.reason(images[:2], images, "a star")
    with pytest.raises(ValueError, match="statement 1 is empty"):
        m.reason(images[0], images[1], ["ok", " "])


def test_other_kinds_say_which_checkpoint_reasons(retrieval_folder):
    m = blip.load(retrieval_folder)
    images = make_images(2)
    with pytest.raises(ValueError, match="NLVR2 checkpoint"):
        m.reason(images[0], images[1], "a star")
