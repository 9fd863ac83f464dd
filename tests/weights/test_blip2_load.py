"""BLIP-2 through the one load path: config.json defaults and validation, sharded safetensors, the legacy split
attention bias, bf16 loading (outputs and peak memory), `save()` back to a folder transformers loads, and one-line
errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip
from blip.blip2_config import Blip2Config, QFormerConfig
from blip.config import ConfigError
from blip.weights.errors import CheckpointError
from blip.weights.registry import PRETRAINED, list_pretrained
from oracle import make_images
from oracle_blip2 import Blip2Spec, build_blip2_checkpoint, checkpoint_factory, hf_blip2_load, hf_blip2_processor

RETRIEVAL = Blip2Spec(kind="retrieval", cross_attention_frequency=1, seed=7)
TEXTS = ["a red circle", "two dogs on the beach near the water"]


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    return checkpoint_factory(tmp_path_factory)


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _hf_scores(folder: Path, images, texts, dtype=None):
    hf, processor = hf_blip2_load(folder, dtype), hf_blip2_processor(folder)
    with torch.no_grad():
        itm = []
        for image in images:
            inputs = processor(images=[image] * len(texts), text=texts, padding=True, return_tensors="pt")
            if dtype is not None:
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            itm.append(hf(**inputs, use_image_text_matching_head=True).logits_per_image.float().softmax(-1)[:, 1])
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        if dtype is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        itc = hf(**inputs, use_image_text_matching_head=False).logits_per_image.float()
    return torch.stack(itm), itc


# --- config ------------------------------------------------------------------------------------------------------


def test_missing_fields_take_transformers_defaults():
    from transformers import Blip2Config as HfBlip2Config

    ours = Blip2Config.from_hf_dict({"model_type": "blip-2"}).validate()
    theirs = HfBlip2Config()
    assert ours.kind == "opt" and ours.num_query_tokens == theirs.num_query_tokens == 32
    assert ours.image_token_index is None and theirs.image_token_index is None
    assert ours.image_text_hidden_size == theirs.image_text_hidden_size
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size"):
        assert getattr(ours.vision, name) == getattr(theirs.vision_config, name), name
    assert ours.vision.layer_norm_eps == theirs.vision_config.layer_norm_eps
    for name in ("hidden_size", "num_hidden_layers", "cross_attention_frequency", "vocab_size", "encoder_hidden_size"):
        assert getattr(ours.qformer, name) == getattr(theirs.qformer_config, name), name
    assert ours.text.hidden_size == theirs.text_config.hidden_size and ours.text.vocab_size == 50272
    # transformers ties the Q-Former's cross-attention width to the vision width, whatever the file says
    data = {
        "vision_config": {"hidden_size": 64, "num_attention_heads": 4},
        "qformer_config": {"encoder_hidden_size": 9},
    }
    assert Blip2Config.from_hf_dict(data).qformer.encoder_hidden_size == 64


def test_kind_from_architectures_and_text_model_type():
    assert Blip2Config.from_hf_dict({"architectures": ["Blip2ForImageTextRetrieval"]}).kind == "retrieval"
    t5 = Blip2Config.from_hf_dict(
        {"architectures": ["Blip2ForConditionalGeneration"], "text_config": {"model_type": "t5"}}
    )
    assert t5.kind == "t5"
    with pytest.raises(ConfigError, match="text_config.model_type = 'llama'"):
        Blip2Config.from_hf_dict({"text_config": {"model_type": "llama"}})
    with pytest.raises(ConfigError, match="not a BLIP-2 model"):
        Blip2Config.from_hf_dict({"model_type": "blip"})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_query_tokens": 0}, "num_query_tokens = 0"),
        ({"vision_config": {"num_attention_heads": 5}}, "vision_config.num_attention_heads = 5"),
        ({"vision_config": {"patch_size": 15}}, "vision_config.patch_size = 15"),
        ({"qformer_config": {"num_attention_heads": 7}}, "qformer_config.num_attention_heads = 7"),
        ({"qformer_config": {"cross_attention_frequency": 0}}, "qformer_config.cross_attention_frequency = 0"),
        ({"qformer_config": {"pad_token_id": 40000}}, "qformer_config.pad_token_id = 40000"),
        ({"text_config": {"model_type": "opt", "vocab_size": 0}}, "text_config.vocab_size"),
        ({"image_token_index": 60000}, "image_token_index = 60000"),
    ],
)
def test_validate_names_the_field_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as info:
        Blip2Config.from_hf_dict({"model_type": "blip-2", **changes}).validate()
    assert "\n" not in str(info.value)


def test_retrieval_needs_the_qformer_text_input():
    config = Blip2Config(kind="retrieval", qformer=QFormerConfig(encoder_hidden_size=1408))
    with pytest.raises(ConfigError, match="use_qformer_text_input"):
        config.validate()


def test_to_hf_dict_is_read_back_by_transformers(make):
    from transformers import Blip2Config as HfBlip2Config

    folder = make(RETRIEVAL)
    ours = Blip2Config.from_hf_dict(json.loads((folder / "config.json").read_text()))
    data = ours.to_hf_dict()
    theirs = HfBlip2Config(**{k: v for k, v in data.items() if k not in ("architectures", "model_type")})
    assert Blip2Config.from_hf_dict({**theirs.to_dict(), "architectures": data["architectures"]}) == ours


# --- registry ----------------------------------------------------------------------------------------------------


def test_every_published_blip2_checkpoint_has_a_short_name():
    names = list_pretrained()
    for name in ("blip2-opt-2.7b", "blip2-opt-6.7b", "blip2-opt-2.7b-coco", "blip2-opt-6.7b-coco", "blip2-flan-t5-xl"):
        assert names[name] == f"Salesforce/{name}"
    for name in ("blip2-flan-t5-xl-coco", "blip2-flan-t5-xxl", "blip2-itm-vit-g"):
        assert names[name] == f"Salesforce/{name}"
    assert PRETRAINED["blip2-opt-2.7b"].prompt_template == "Question: {} Answer:"
    assert PRETRAINED["blip2-flan-t5-xl"].kind == "t5" and PRETRAINED["blip2-itm-vit-g"].kind == "retrieval"


# --- files -------------------------------------------------------------------------------------------------------


def test_sharded_checkpoint_loads_and_a_missing_shard_is_one_line(tmp_path):
    folder = build_blip2_checkpoint(tmp_path / "sharded", RETRIEVAL, max_shard_size="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").exists()
    ours = blip.load(folder)
    itm, itc = _hf_scores(folder, make_images(1), TEXTS)
    torch.testing.assert_close(torch.tensor(ours.match(make_images(1)[0], TEXTS)), itm[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.similarity(make_images(1), TEXTS), itc, atol=1e-4, rtol=1e-4)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"the shard '{shards[1].name}' does not exist") as info:
        blip.load(folder)
    assert "\n" not in str(info.value)


def test_legacy_split_qv_bias_is_fused(make, tmp_path):
    """transformers < 4.47 saved the EVA attention bias as `q_bias` + `v_bias` (no key bias)."""
    folder = _copy(make(RETRIEVAL), tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    for key in [k for k in state if k.endswith("self_attn.qkv.bias")]:
        q, _, v = state.pop(key).chunk(3)
        prefix = key[: -len("qkv.bias")]
        state[prefix + "q_bias"], state[prefix + "v_bias"] = q.clone(), v.clone()
    save_file(state, str(folder / "model.safetensors"))
    model = blip.load(folder).model
    bias = model.vision_model.encoder.layers[0].self_attn.qkv.bias
    width = bias.shape[0] // 3
    assert torch.equal(bias[:width], state["vision_model.encoder.layers.0.self_attn.q_bias"])
    assert not bias[width : 2 * width].any()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(num_query_tokens=0), "num_query_tokens = 0"),
        (lambda c: c["qformer_config"].update(num_attention_heads=3), "qformer_config.num_attention_heads = 3"),
        (lambda c: c.update(num_query_tokens=5), "query_tokens: checkpoint"),
        (lambda c: c["qformer_config"].update(num_hidden_layers=3), "missing: qformer.encoder.layer.2"),
    ],
)
def test_bad_config_is_one_checkpoint_error(make, tmp_path, edit, message):
    folder = _copy(make(RETRIEVAL), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as info:
        blip.load(folder)
    assert "\n" not in str(info.value)


def test_blip1_kind_for_a_blip2_checkpoint_is_refused(make):
    with pytest.raises(CheckpointError, match="BLIP-2 checkpoint: kind must be one of"):
        blip.load(make(RETRIEVAL), kind="caption")


# --- dtype -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_has_transformers_dtypes_and_outputs(make, dtype):
    """fp16 keeps the query tokens and the Q-Former in fp32 (transformers' `_keep_in_fp32_modules`); bf16 does not."""
    folder = make(RETRIEVAL)
    ours = blip.load(folder, dtype=dtype)
    model = ours.model
    qformer_dtype = torch.float32 if dtype == torch.float16 else dtype
    assert model.query_tokens.dtype == qformer_dtype
    assert {p.dtype for p in model.qformer.parameters()} == {qformer_dtype}
    assert model.vision_model.post_layernorm.weight.dtype == dtype
    assert model.embeddings.word_embeddings.weight.dtype == dtype
    hf = hf_blip2_load(folder, dtype)
    assert {k: v.dtype for k, v in model.state_dict().items()} == {k: v.dtype for k, v in hf.state_dict().items()}
    images = make_images(2, seed=4)
    itm, itc = _hf_scores(folder, images, TEXTS, dtype)
    got_itm = torch.tensor([ours.match(image, TEXTS) for image in images])
    torch.testing.assert_close(got_itm, itm, atol=2e-2, rtol=0)
    torch.testing.assert_close(ours.similarity(images, TEXTS), itc, atol=2e-2, rtol=0)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import blip

    def peak():  # this process's own high-water mark (ru_maxrss would include the parent's, from before exec)
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])

    before = peak()
    model = blip.load(sys.argv[1], dtype="bfloat16").model
    print((peak() - before) * 1024)
    """
)


def test_bf16_load_peak_memory_stays_near_the_bf16_size(tmp_path):
    """A ~300 MB fp32 checkpoint loaded in bf16: the peak grows by about the bf16 size, not the fp32 one."""
    from blip.blip2_config import Blip2VisionConfig
    from blip.models.blip2.blip2 import Blip2Model
    from blip.weights.load import save_blip2

    vision = Blip2VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=16)
    qformer = QFormerConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64, vocab_size=100,
        encoder_hidden_size=1024, use_qformer_text_input=True,
    )  # fmt: skip
    config = Blip2Config(vision=vision, qformer=qformer, kind="retrieval", num_query_tokens=4).validate()
    model = Blip2Model(config)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    save_blip2(model, tmp_path / "big")
    del model
    (tmp_path / "big" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    assert fp32_bytes > 250e6
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big")], capture_output=True, text=True, check=True
    )
    grown = int(result.stdout.strip().splitlines()[-1])
    assert grown < 0.7 * fp32_bytes, (
        f"loading in bf16 grew the peak by {grown / 1e6:.0f} MB (fp32: {fp32_bytes / 1e6:.0f})"
    )


# --- save --------------------------------------------------------------------------------------------------------


def test_save_gives_a_folder_transformers_loads_with_the_same_outputs(make, tmp_path):
    folder = make(RETRIEVAL)
    ours = blip.load(folder)
    ours.save(tmp_path / "saved")
    saved = tmp_path / "saved"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json"):
        assert (saved / name).exists(), name
    images = make_images(2, seed=5)
    itm, itc = _hf_scores(saved, images, TEXTS)  # transformers' model and processor from our folder
    again = blip.load(saved)
    torch.testing.assert_close(torch.tensor([again.match(i, TEXTS) for i in images]), itm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.similarity(images, TEXTS), itc, atol=1e-4, rtol=1e-4)
    original = hf_blip2_load(folder).state_dict()
    resaved = hf_blip2_load(saved).state_dict()
    assert original.keys() == resaved.keys() and all(torch.equal(original[k], resaved[k]) for k in original)


@pytest.mark.parametrize(
    "spec",
    [Blip2Spec(kind="opt", seed=9), Blip2Spec(kind="t5", seed=10), Blip2Spec(kind="t5", untied_head=True, seed=11)],
    ids=["opt", "t5-tied", "t5-untied"],
)
def test_save_of_a_generation_checkpoint_round_trips_through_transformers(make, tmp_path, spec):
    pytest.importorskip(f"blip.models.blip2.{spec.kind}")
    folder = make(spec)
    blip.load(folder).save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["text_config"]["model_type"] == spec.kind
    original = hf_blip2_load(folder).state_dict()
    resaved = hf_blip2_load(tmp_path / "saved").state_dict()
    assert original.keys() == resaved.keys() and all(torch.equal(original[k], resaved[k]) for k in original)
    saved_keys = set(load_file(str(tmp_path / "saved" / "model.safetensors")))
    assert saved_keys == set(load_file(str(folder / "model.safetensors")))  # one name per tied tensor, as transformers


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_fp16_generation_checkpoint_has_transformers_dtypes(make, kind):
    pytest.importorskip(f"blip.models.blip2.{kind}")
    folder = make(Blip2Spec(kind=kind, seed=12))
    model = blip.load(folder, dtype="float16").model
    hf = hf_blip2_load(folder, torch.float16)
    assert {k: v.dtype for k, v in model.state_dict().items()} == {k: v.dtype for k, v in hf.state_dict().items()}
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf.get_image_features(x.half()).pooler_output
        got = model.language_inputs(model.query_output(model.encode_image(x)))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-2, rtol=1e-2)


# --- API ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_generation_checkpoint_api(make, kind):
    from blip.tokenizer import LmTokenizer

    pytest.importorskip(f"blip.models.blip2.{kind}")
    ours = blip.load(make(Blip2Spec(kind=kind)))
    assert isinstance(ours, blip.Blip) and ours.tasks == {"caption", "vqa"}
    assert isinstance(ours.tokenizer, LmTokenizer) and ours.prompt_template == "Question: {} Answer:"
    assert ours.transform.image_size == 28
    with pytest.raises(ValueError, match="blip2-itm-vit-g"):
        ours.match(make_images(1)[0], "a dog")
    with pytest.raises(ValueError, match="blip2-itm-vit-g"):
        ours.similarity(make_images(1)[0], "a dog")


def test_missing_tokenizer_files_are_one_line_errors(make, tmp_path):
    folder = _copy(make(Blip2Spec(kind="opt")), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="tokenizer") as info:
        blip.load(folder)
    assert "\n" not in str(info.value)
    retrieval = _copy(make(RETRIEVAL), tmp_path / "r")
    (retrieval / "tokenizer.json").unlink()
    (retrieval / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match="ships no tokenizer"):
        blip.load(retrieval)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 10**12]},  # far past the end of the file
        {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},  # reversed
        {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},  # shape does not fit the bytes
        {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]},
    ],
)
def test_a_crafted_safetensors_header_is_refused_before_any_allocation(tmp_path, entry):
    """The dtype-casting reader checks every entry's offsets and shape against the file before reserving memory."""
    import struct

    from blip.weights.read import read_safetensors

    header = json.dumps({"w": entry}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError) as err:
        read_safetensors(path, dtype_of=lambda key: torch.bfloat16)
    assert "\n" not in str(err.value) and "w:" in str(err.value)
