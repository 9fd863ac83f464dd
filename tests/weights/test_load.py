"""Checkpoint loading: HF folders, original-layout .pth files, saving back, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip
from blip.weights import convert
from blip.weights.load import CheckpointError
from oracle import TinySpec, hf_load, make_images
from original_layout import original_keys, to_original

CAPTION = TinySpec(kind="caption", seed=11)
VQA = TinySpec(kind="vqa", seed=12)
RETRIEVAL = TinySpec(kind="retrieval", seed=13)


def outputs(model: blip.Blip, images) -> list:
    kind = model.config.kind
    if kind == "caption":
        return [c.token_ids for c in model.caption(images, num_beams=2, max_new_tokens=8)]
    if kind == "vqa":
        return [a.token_ids for a in model.answer(images, ["what is it?"] * len(images))]
    return model.match(images, ["a red circle"] * len(images)) + model.similarity(images, "a dog").flatten().tolist()


def same(a: list, b: list) -> bool:
    return all((x == y) if not isinstance(x, float) else abs(x - y) < 1e-5 for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.parametrize("spec", [CAPTION, VQA, RETRIEVAL], ids=lambda s: s.kind)
def test_salesforce_pth_loads_like_the_hf_folder(hf_checkpoints, tmp_path, spec):
    folder = hf_checkpoints(spec)
    original = to_original(load_file(str(folder / "model.safetensors")))
    assert sorted(original) == sorted(original_keys(spec.kind, vision_layers=2, text_layers=2))
    # what an original pretrain/retrieval file also carries: momentum copies, queues, temperature
    original["visual_encoder_m.cls_token"] = original["visual_encoder.cls_token"].clone()
    original["image_queue"] = torch.randn(8, 16)
    original["temp"] = torch.tensor(0.07)
    pth = tmp_path / "model_original.pth"
    torch.save({"model": original, "epoch": 3, "config": {"note": "original"}}, pth)

    from_pth = blip.load(pth, tokenizer=folder, config=folder)
    from_hf = blip.load(folder)
    assert from_pth.config.kind == spec.kind
    assert from_pth.report.layout == "salesforce"
    assert "image_queue" in from_pth.report.dropped_keys
    images = make_images(3, seed=1)
    assert same(outputs(from_pth, images), outputs(from_hf, images))


def test_split_qkv_checkpoints_are_fused(hf_checkpoints, tmp_path):
    folder = hf_checkpoints(CAPTION)
    original = to_original(load_file(str(folder / "model.safetensors")))
    split = {}
    for key, value in original.items():
        if ".attn.qkv." in key:
            q, k, v = value.chunk(3, dim=0)
            kind = key.rsplit(".", 1)[1]
            for name, part in zip("qkv", (q, k, v)):
                split[key.replace(".qkv.", f".{name}_proj.")] = part
            if kind == "bias":  # EVA-style: q_bias and v_bias only, k bias implied zero
                for name, part in (("q", q), ("v", v)):
                    split[key.replace("qkv.bias", f"{name}_bias")] = part
                for name in "qkv":
                    split.pop(key.replace(".qkv.", f".{name}_proj."))
        else:
            split[key] = value
    converted, _ = convert.convert_state_dict(split)
    reference, _ = convert.convert_state_dict(original)
    for key, value in converted.items():
        if "qkv.bias" in key:
            q, _, v = reference[key].chunk(3)
            assert torch.equal(value, torch.cat([q, torch.zeros_like(q), v]))
        else:
            assert torch.equal(value, reference[key]), key
    assert set(converted) == set(reference)


def test_pth_with_other_image_size_gets_position_embeddings_resized(hf_checkpoints, tmp_path):
    folder = hf_checkpoints(CAPTION)
    state = to_original(load_file(str(folder / "model.safetensors")))
    pos = state["visual_encoder.pos_embed"]  # grid 4x4 at 32 px
    from blip.models.vit import resize_pos_embed

    state["visual_encoder.pos_embed"] = resize_pos_embed(pos, 6)  # as if trained at 48 px
    pth = tmp_path / "m.pth"
    torch.save({"model": state}, pth)
    native = blip.load(pth, tokenizer=folder, config=_config_for(folder, tmp_path, 48))
    assert native.config.vision.image_size == 48
    resized = blip.load(pth, tokenizer=folder, config=_config_for(folder, tmp_path, 48), image_size=32)
    assert resized.report.resized_position_embedding == (36, 16)
    assert resized.transform.image_size == 32


def _config_for(folder, tmp_path, image_size):
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["image_size"] = image_size
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path / "config.json"


def test_pth_sizes_are_read_off_the_shapes(tmp_path):
    from blip.config import get_preset
    from blip.models.blip import BlipModel

    model = BlipModel(get_preset("blip_test").replace(kind="caption"))
    # heads 64 wide, as in every published checkpoint
    cfg = get_preset("blip_base_caption")
    inferred = convert.infer_config(convert.convert_state_dict(to_original(convert.to_hf(model.state_dict())))[0])
    assert inferred.kind == "caption" and inferred.vision.num_hidden_layers == 2
    assert inferred.vision.image_size == 32 and inferred.text.vocab_size == 30524
    assert inferred.vision.num_attention_heads == 1 and inferred.text.num_attention_heads == 1
    assert cfg.text.num_attention_heads == 12


@pytest.mark.parametrize("kind", ["caption", "vqa", "retrieval"])
def test_every_original_base_key_converts_onto_the_model(kind):
    """The full key list of an original base-size file (written out in original_layout.py) lands exactly on our
    model's parameters: a wrong or missing name in the conversion table fails here."""
    from blip.config import get_preset
    from blip.models.blip import BlipModel

    keys = original_keys(kind)
    assert len([k for k in keys if k.startswith("visual_encoder.")]) == 150
    if kind == "caption":
        assert len(keys) == 150 + 324
    if kind == "retrieval":
        assert len(keys) == 150 + 317 + 6
    state = {k: torch.zeros(1) for k in keys}
    converted, dropped = convert.convert_state_dict(state)
    assert dropped == []
    with torch.device("meta"):
        model = BlipModel(get_preset(f"blip_base_{kind}"))
    assert sorted(converted) == sorted(model.state_dict())


@pytest.mark.parametrize("spec", [CAPTION, VQA, RETRIEVAL], ids=lambda s: s.kind)
def test_save_writes_a_folder_transformers_loads(hf_checkpoints, tmp_path, spec):
    folder = hf_checkpoints(spec)
    ours = blip.load(folder)
    ours.save(tmp_path / "saved")
    hf_saved, processor = hf_load(tmp_path / "saved", spec.kind)
    hf_orig, _ = hf_load(folder, spec.kind)
    for (name, a), (_, b) in zip(sorted(hf_saved.state_dict().items()), sorted(hf_orig.state_dict().items())):
        assert torch.equal(a, b), name
    images = make_images(2, seed=3)
    assert same(outputs(blip.load(tmp_path / "saved"), images), outputs(ours, images))
    ref = processor(images=images, text=["a dog", "two"], padding=True, return_tensors="pt")
    assert (ours.transform(images) - ref["pixel_values"]).abs().max() < 1e-6
    ids, _ = ours.tokenizer(["a dog", "two"])
    assert ids.tolist() == ref["input_ids"].tolist()


def test_bin_weights_and_missing_tied_entries(hf_checkpoints, tmp_path):
    folder = hf_checkpoints(CAPTION)
    copy = tmp_path / "bin"
    shutil.copytree(folder, copy)
    state = load_file(str(copy / "model.safetensors"))
    (copy / "model.safetensors").unlink()
    state["text_decoder.cls.predictions.decoder.weight"] = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
    torch.save(state, copy / "pytorch_model.bin")
    images = make_images(2)
    assert outputs(blip.load(copy), images) == outputs(blip.load(folder), images)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        blip.load(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights in"):
        blip.load(tmp_path / "empty")


def test_corrupt_weights_name_the_file(hf_checkpoints, tmp_path):
    copy = tmp_path / "corrupt"
    shutil.copytree(hf_checkpoints(CAPTION), copy)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        blip.load(copy)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="junk.pth"):
        blip.load(tmp_path / "junk.pth")


def test_config_weights_mismatch_names_the_keys(hf_checkpoints, tmp_path):
    copy = tmp_path / "mismatch"
    shutil.copytree(hf_checkpoints(CAPTION), copy)
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 64
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"wrong shape: text_decoder\.bert\.encoder\.layer\.0\.intermediate"):
        blip.load(copy)
    state = load_file(str(hf_checkpoints(CAPTION) / "model.safetensors"))
    state.pop("vision_model.post_layernorm.weight")
    state["vision_model.extra.weight"] = torch.zeros(1)
    save_file(state, str(copy / "model.safetensors"))
    shutil.copy(hf_checkpoints(CAPTION) / "config.json", copy / "config.json")
    with pytest.raises(CheckpointError, match=r"missing: vision_model\.post_layernorm\.weight") as err:
        blip.load(copy)
    assert "unexpected: vision_model.extra.weight" in str(err.value)


def test_hub_id_not_reachable_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="Salesforce/blip-does-not-exist"):
        blip.load("Salesforce/blip-does-not-exist")


def test_hub_id_loads_from_the_local_cache(hf_checkpoints, monkeypatch, tmp_path):
    """A hub id resolves through huggingface_hub's cache layout (models--org--name/snapshots/REV)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    repo = tmp_path / "hf" / "hub" / "models--Salesforce--blip-image-captioning-base"
    revision = "0" * 40
    shutil.copytree(hf_checkpoints(CAPTION), repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    model = blip.load("caption-base")
    assert model.config.kind == "caption"
    images = make_images(1)
    assert outputs(model, images) == outputs(blip.load(hf_checkpoints(CAPTION)), images)


def test_unsupported_task_names_the_checkpoint_kind(hf_checkpoints):
    model = blip.load(hf_checkpoints(CAPTION))
    assert model.tasks == {"caption"}
    with pytest.raises(ValueError, match="VQA checkpoint"):
        model.answer(make_images(1)[0], "what?")
    with pytest.raises(ValueError, match="retrieval/ITM checkpoint"):
        model.match(make_images(1)[0], "a dog")


def test_bfloat16_load_runs(hf_checkpoints):
    model = blip.load(hf_checkpoints(CAPTION), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    caption = model.caption(make_images(1)[0], max_new_tokens=5)[0]
    assert caption.token_ids[0] == model.config.text.bos_token_id
