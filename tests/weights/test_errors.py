"""Loading refuses what it cannot load, in one clear line, before allocating anything from a bad description:
invalid configs (sizes, heads, patches, token ids), what cannot be inferred from an original `.pth`, files that are
not checkpoints, hub ids that cannot be fetched, paths that do not exist, shard indexes pointing outside the folder.
The CLI cases run the real `blip` command: exit code 2, one stderr line, no traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import blip
from blip.config import BlipConfig, ConfigError, get_preset
from blip.data.vocab import config_for, shapes_tokenizer
from blip.models.blip import BlipModel
from blip.weights import convert
from blip.weights import load as weights_load
from blip.weights.load import CheckpointError, locate
from oracle import TinySpec
from original_layout import to_original

CAPTION = TinySpec(kind="caption", seed=41)
NO_TORCH_ADVICE = "weights_only"  # torch's text for refused pickles advises weights_only=False: never shown


def _with_config(folder: Path, tmp_path: Path, section: str | None, field: str, value) -> Path:
    copy = tmp_path / f"bad-{section}-{field}"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (config[section] if section else config)[field] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _blip_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blip.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        timeout=120,
    )


def _one_line_exit_2(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def image_file(tmp_path) -> str:
    path = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(path)
    return str(path)


# --- config validation ---------------------------------------------------------------------------------------------


def test_every_preset_and_the_defaults_are_valid():
    from blip.config import PRESETS

    for config in (BlipConfig(), *PRESETS.values()):
        assert config.validate() is config


@pytest.mark.parametrize(
    "section, field, value, message",
    [
        ("vision", "hidden_size", 10**9, "vision_config.hidden_size = 1000000000: must be between 1 and"),
        ("vision", "hidden_size", 1e9, "vision_config.hidden_size = 1000000000.0: must be an integer"),
        ("vision", "patch_size", 0, "vision_config.patch_size = 0: must be between 1"),
        ("vision", "patch_size", 5, "vision_config.patch_size = 5 does not divide vision_config.image_size = 384"),
        ("vision", "num_attention_heads", 0, "vision_config.num_attention_heads = 0: must be between 1"),
        ("vision", "num_attention_heads", 5, "num_attention_heads = 5 does not divide vision_config.hidden_size"),
        ("vision", "image_size", 384000, "vision_config.image_size = 384000: must be between 1 and"),
        ("vision", "image_size", 4096, "makes 65536 patches"),
        ("text", "num_attention_heads", 0, "text_config.num_attention_heads = 0: must be between 1"),
        ("text", "num_hidden_layers", 0, "text_config.num_hidden_layers = 0"),
        ("text", "vocab_size", 100, "text_config.bos_token_id = 30522 is outside the vocabulary"),
        ("text", "sep_token_id", -1, "text_config.sep_token_id = -1 is outside the vocabulary"),
        ("text", "layer_norm_eps", 0.0, "text_config.layer_norm_eps = 0.0: must be positive"),
        ("text", "hidden_dropout_prob", 1.5, "text_config.hidden_dropout_prob = 1.5: must be in [0, 1)"),
    ],
)
def test_validate_names_the_field(section, field, value, message):
    base = BlipConfig()
    part = getattr(base, section)
    import dataclasses

    config = base.replace(**{section: dataclasses.replace(part, **{field: value})})
    with pytest.raises(ConfigError) as err:
        config.validate()
    assert message in str(err.value)


def test_enc_token_must_fit_when_the_kind_needs_it():
    text = get_preset("blip_base_retrieval").text
    import dataclasses

    tight = dataclasses.replace(text, vocab_size=30523)  # [DEC] = 30522 fits, [ENC] = 30523 does not
    BlipConfig(text=tight, kind="caption").validate()
    with pytest.raises(ConfigError, match=r"needs \[ENC\] = bos_token_id \+ 1 = 30523"):
        BlipConfig(text=tight, kind="retrieval").validate()


@pytest.mark.parametrize(
    "section, field, value, message",
    [
        ("vision_config", "hidden_size", 1e9, "vision_config.hidden_size"),
        ("vision_config", "patch_size", 0, "vision_config.patch_size = 0"),
        ("vision_config", "num_attention_heads", 0, "vision_config.num_attention_heads = 0"),
        ("text_config", "num_attention_heads", 0, "text_config.num_attention_heads = 0"),
        ("text_config", "bos_token_id", 500, "text_config.bos_token_id = 500 is outside the vocabulary"),
        (None, "image_text_hidden_size", "big", "image_text_hidden_size = 'big': must be an integer"),
    ],
)
def test_a_bad_config_json_is_refused_naming_file_and_field(hf_checkpoints, tmp_path, section, field, value, message):
    folder = _with_config(hf_checkpoints(CAPTION), tmp_path, section, field, value)
    with pytest.raises(CheckpointError) as err:
        blip.load(folder)
    assert str(folder / "config.json") in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_huge_image_size_is_refused_before_anything_is_allocated(hf_checkpoints, tmp_path, monkeypatch):
    """image_size 384000 once made the position-embedding resize allocate ~295 GB."""

    def no_resize(*args, **kwargs):
        raise AssertionError("the position embeddings must not be resized for an invalid config")

    monkeypatch.setattr(weights_load, "resize_pos_embed", no_resize)
    folder = _with_config(hf_checkpoints(CAPTION), tmp_path, "vision_config", "image_size", 384000)
    with pytest.raises(CheckpointError, match="vision_config.image_size = 384000"):
        blip.load(folder)
    with pytest.raises(CheckpointError, match="vision_config.image_size = 384000"):
        blip.load(hf_checkpoints(CAPTION), image_size=384000)


def test_the_cli_refuses_a_bad_config_in_one_line(hf_checkpoints, tmp_path, image_file):
    folder = _with_config(hf_checkpoints(CAPTION), tmp_path, "text_config", "num_attention_heads", 0)
    line = _one_line_exit_2(_blip_cli("caption", "--model", str(folder), image_file))
    assert "config.json" in line and "text_config.num_attention_heads = 0" in line
    folder = _with_config(hf_checkpoints(CAPTION), tmp_path, "vision_config", "image_size", 384000)
    line = _one_line_exit_2(_blip_cli("convert", str(folder), str(tmp_path / "out")))
    assert "vision_config.image_size = 384000" in line
    assert not (tmp_path / "out").exists()


# --- what an original .pth cannot tell -----------------------------------------------------------------------------


def test_pth_with_heads_not_64_wide_is_refused_and_asks_for_a_config(hf_checkpoints, tmp_path, image_file):
    folder = hf_checkpoints(CAPTION)  # widths 32: heads cannot be 64 wide
    pth = tmp_path / "model.pth"
    torch.save({"model": to_original(load_file(str(folder / "model.safetensors")))}, pth)
    with pytest.raises(CheckpointError, match=r"width 32 is not a multiple of 64.*--config \(Python: config=\)"):
        blip.load(pth, tokenizer=folder)
    assert blip.load(pth, tokenizer=folder, config=folder).config.vision.num_attention_heads == 2
    line = _one_line_exit_2(_blip_cli("convert", str(pth), str(tmp_path / "out"), "--tokenizer", str(folder)))
    assert "--config" in line and "not a multiple of 64" in line
    assert not (tmp_path / "out").exists()


def test_pth_whose_token_ids_fall_outside_its_vocabulary_is_refused(tmp_path):
    """64-wide widths pass the head check, but a small vocabulary cannot hold the default [DEC] id 30522."""
    tokenizer = shapes_tokenizer()
    model = BlipModel(config_for(tokenizer, get_preset("blip_test").replace(kind="caption")))
    pth = tmp_path / "shapes.pth"
    torch.save({"model": to_original(convert.to_hf(model.state_dict()))}, pth)
    vocab = model.config.text.vocab_size
    with pytest.raises(CheckpointError) as err:
        blip.load(pth)
    message = str(err.value)
    assert f"text_config.bos_token_id = 30522 is outside the vocabulary (text_config.vocab_size = {vocab})" in message
    assert "inferred from the tensor shapes" in message and "--config" in message


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    tokenizer = shapes_tokenizer()
    model = BlipModel(config_for(tokenizer, get_preset("blip_test").replace(kind="caption")))
    blip.Blip.from_model(model, tokenizer).save(tmp_path / "small")
    (tmp_path / "big").mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(200)]
    (tmp_path / "big" / "vocab.txt").write_text("\n".join(words) + "\n")
    assert blip.load(tmp_path / "small").tokenizer.vocab_size == tokenizer.vocab_size
    with pytest.raises(CheckpointError, match="the tokenizer has 205 tokens but the model"):
        blip.load(tmp_path / "small", tokenizer=tmp_path / "big")


# --- files that are not checkpoints --------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/blip-evil-pickle-ran",))


def _garbage_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "random.pth": os.urandom(4096),
        "notes.txt": b"hello world\nthis is a text file, not a model\n",
        "evil.pth": pickle.dumps(_Evil()),
        "broken-zip.pth": b"PK\x03\x04" + os.urandom(200),
        "garbage.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + os.urandom(64),
        "empty.pt": b"",
    }
    paths = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = tmp_path / name
    good = tmp_path / "list.pt"
    torch.save([1, 2, 3], good)
    paths["list.pt"] = good
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    paths["truncated.pt"] = truncated
    return paths


def test_files_that_are_not_checkpoints_get_one_line_without_torch_advice(tmp_path):
    Path("/tmp/blip-evil-pickle-ran").unlink(missing_ok=True)
    expected = {
        "random.pth": "is not a PyTorch checkpoint (it is a file starting with",
        "notes.txt": "is not a PyTorch checkpoint (it is a text file",
        "evil.pth": "never unpickles (that could run code from the file)",
        "broken-zip.pth": "is a damaged or truncated PyTorch zip file",
        "garbage.safetensors": "is not a readable safetensors file",
        "empty.pt": "is not a PyTorch checkpoint",
        "list.pt": "is a PyTorch file but not a model",
        "truncated.pt": "is a damaged or truncated PyTorch zip file",
    }
    for name, path in _garbage_files(tmp_path).items():
        with pytest.raises(CheckpointError) as err:
            blip.load(path)
        message = str(err.value)
        assert expected[name] in message, (name, message)
        assert str(path) in message and "expected a Hugging Face folder" in message, name
        assert NO_TORCH_ADVICE not in message and "\n" not in message, (name, message)
    assert not Path("/tmp/blip-evil-pickle-ran").exists()


@pytest.mark.parametrize("name", ["notes.txt", "random.pth", "evil.pth"])
def test_the_cli_says_what_the_file_is_not_in_one_line(tmp_path, image_file, name):
    path = _garbage_files(tmp_path)[name]
    line = _one_line_exit_2(_blip_cli("caption", "--model", str(path), image_file))
    assert str(path) in line and "expected a Hugging Face folder" in line
    assert NO_TORCH_ADVICE not in line and "KeyError" not in line


# --- hub ids and paths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["runs/nope/model", "nope.pth", "model.safetensors", "./nope", "~/nope-blip-model", "a b", "x//y"],
)
def test_paths_that_look_like_paths_are_paths(text, monkeypatch):
    def no_hub(repo_id):
        raise AssertionError(f"{text!r} must not be looked up on the hub")

    monkeypatch.setattr(weights_load, "_download", no_hub)
    with pytest.raises(CheckpointError, match="checkpoint not found: .* does not exist"):
        locate(text)


def test_a_missing_folder_under_an_existing_one_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(weights_load, "_download", lambda repo_id: pytest.fail("looked up on the hub"))
    with pytest.raises(CheckpointError, match="checkpoint not found: runs/model does not exist"):
        locate("runs/model")


def test_hub_ids_go_to_the_hub(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(weights_load, "_download", lambda repo_id: asked.append(repo_id) or tmp_path)
    locate("Salesforce/blip-vqa-base")
    locate("caption-base")
    locate("bert-base-uncased")
    assert asked == ["Salesforce/blip-vqa-base", "Salesforce/blip-image-captioning-base", "bert-base-uncased"]


def test_an_unreachable_hub_id_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError) as err:
        blip.load("Salesforce/blip-does-not-exist")
    message = str(err.value)
    assert "'Salesforce/blip-does-not-exist'" in message and "HF_HUB_OFFLINE=1" in message
    assert str(tmp_path / "hf" / "hub") in message
    assert "blip convert" in message and "blip demo --smoke" in message and "local folder" in message
    assert "local_files_only" not in message and "\n" not in message


def test_the_cli_explains_an_unreachable_hub_and_a_missing_path_in_one_line(tmp_path, image_file):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    line = _one_line_exit_2(_blip_cli("caption", "--model", "Salesforce/blip-bogus-model", image_file, env=env))
    assert "Salesforce/blip-bogus-model" in line and "HF_HUB_OFFLINE" in line and "blip convert" in line
    assert "local_files_only" not in line and "LocalEntryNotFoundError" not in line
    line = _one_line_exit_2(_blip_cli("caption", "--model", "runs/nope/model", image_file, env=env))
    assert "checkpoint not found: runs/nope/model" in line and "HFValidationError" not in line


# --- sharded indexes -----------------------------------------------------------------------------------------------


def _sharded(folder: Path, tmp_path: Path, name: str) -> tuple[Path, dict]:
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    state = load_file(str(copy / "model.safetensors"))
    (copy / "model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, str(copy / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[half:]}, str(copy / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys[:half]}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in keys[half:]})
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return copy, weight_map


def test_a_sharded_folder_loads(hf_checkpoints, tmp_path):
    folder, _ = _sharded(hf_checkpoints(CAPTION), tmp_path, "sharded")
    sharded = blip.load(folder).model.state_dict()
    for key, value in blip.load(hf_checkpoints(CAPTION)).model.state_dict().items():
        assert torch.equal(sharded[key], value), key


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_an_index_naming_files_outside_the_folder_is_refused_and_they_are_not_read(
    hf_checkpoints, tmp_path, monkeypatch, escape
):
    folder, weight_map = _sharded(hf_checkpoints(CAPTION), tmp_path, "sharded")
    outside = tmp_path / "outside" / "stolen.safetensors"
    outside.parent.mkdir()
    shutil.move(folder / "model-00002-of-00002.safetensors", outside)
    name = {"dotdot": "../outside/stolen.safetensors", "absolute": str(outside), "symlink": "link.safetensors"}[escape]
    if escape == "symlink":
        (folder / "link.safetensors").symlink_to(outside)
    weight_map = {k: (name if v.startswith("model-00002") else v) for k, v in weight_map.items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    read = []
    real = weights_load.read_safetensors
    monkeypatch.setattr(weights_load, "read_safetensors", lambda path: read.append(Path(path)) or real(path))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        blip.load(folder)
    assert outside not in [p.resolve() for p in read] and read == []
