"""The image encoder's start: a sine-cosine position table, `vision_init` from our files, timm/DeiT ViTs and the
original layout, and the supervised pretraining that writes such a file (`blip.train.vision`)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from train_helpers import tiny_config

from blip.models.init import sincos_position_table
from blip.models.vit import resize_pos_embed
from blip.train.config import ConfigError
from blip.train.modeling import ModelInitError, build_model
from blip.train.vision import VisionPretrainConfig, pretrain_vision
from blip.weights.errors import CheckpointError
from original_layout import original_name


def _tiny(tmp_path, **changes):
    return tiny_config("pretrain", tmp_path, tmp_path / "run", **changes)


def test_sincos_table_encodes_row_and_column():
    grid, dim = 4, 16
    table = sincos_position_table(grid, dim)[0]
    assert table.shape == (1 + grid * grid, dim)
    assert torch.equal(table[0], torch.zeros(dim))  # the CLS token has no place
    patches = table[1:].reshape(grid, grid, dim)
    # first half of the channels: the row (equal along a row), second half: the column (equal down a column)
    assert torch.equal(patches[2, 0, : dim // 2], patches[2, 3, : dim // 2])
    assert torch.equal(patches[0, 1, dim // 2 :], patches[3, 1, dim // 2 :])
    assert not torch.equal(patches[1, 0, : dim // 2], patches[2, 0, : dim // 2])
    assert len({tuple(row.tolist()) for row in table[1:]}) == grid * grid
    # patch (row 1, column 2): sin(1 * 1), cos(1 * 1) at the lowest frequency (1) of each half
    assert patches[1, 2, 0].item() == pytest.approx(math.sin(1.0))
    assert patches[1, 2, dim // 4].item() == pytest.approx(math.cos(1.0))
    assert patches[1, 2, dim // 2].item() == pytest.approx(math.sin(2.0))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_table(4, 18)


def test_pos_init_sincos_starts_the_vit_from_the_table(tmp_path):
    model, _ = build_model(_tiny(tmp_path, pos_init="sincos"))
    table = model.vision_model.embeddings.position_embedding
    grid = int(round((table.shape[1] - 1) ** 0.5))
    assert torch.equal(table.detach(), sincos_position_table(grid, table.shape[2]))
    assert table.requires_grad  # a start, not a frozen table
    normal, _ = build_model(_tiny(tmp_path))
    assert normal.vision_model.embeddings.position_embedding.std().item() < 0.05  # the default: std 0.02


def _vision(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.vision_model.state_dict().items()}


@pytest.mark.parametrize("layout", ["ours", "timm", "original", "hf-folder"])
def test_vision_init_takes_the_image_encoder_of_each_layout(tmp_path, layout):
    torch.manual_seed(3)
    source, _ = build_model(_tiny(tmp_path))
    vision = _vision(source)
    hf = {f"vision_model.{k}": v for k, v in vision.items()}
    if layout == "ours":
        path = tmp_path / "vision.safetensors"
        save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    elif layout == "timm":  # a bare timm ViT classifier: names without `visual_encoder.`, a head to drop
        timm = {original_name(k).removeprefix("visual_encoder."): v for k, v in hf.items()}
        timm |= {"head.weight": torch.randn(10, vision["post_layernorm.weight"].shape[0]), "head.bias": torch.zeros(10)}
        path = tmp_path / "deit.pth"
        torch.save({"model": timm}, path)
    elif layout == "original":  # a whole original BLIP file: its visual_encoder part is taken
        path = tmp_path / "model_base.pth"
        state = {original_name(k): v for k, v in source.state_dict().items()}
        torch.save({"model": state}, path)
    else:  # a whole model's folder (what `blip train` writes beside its checkpoint)
        from blip.weights.load import model_for_kind, save_model

        path = tmp_path / "model"
        save_model(model_for_kind(source, "caption"), path)
    torch.manual_seed(4)
    started, _ = build_model(_tiny(tmp_path, vision_init=str(path)))
    for key, value in _vision(started).items():
        assert torch.equal(value, vision[key]), key
    # the rest of the model is its own random init
    a = source.text_encoder.embeddings.word_embeddings.weight
    b = started.text_encoder.embeddings.word_embeddings.weight
    assert not torch.equal(a, b)


def test_vision_init_resizes_the_position_table_to_the_run(tmp_path):
    source, _ = build_model(_tiny(tmp_path))
    path = tmp_path / "vision.safetensors"
    save_file({f"vision_model.{k}": v.contiguous() for k, v in _vision(source).items()}, str(path))
    patch = source.vision_model.config.patch_size
    bigger = source.vision_model.config.image_size + 2 * patch
    started, _ = build_model(_tiny(tmp_path, vision_init=str(path), image_size=bigger))
    expected = resize_pos_embed(source.vision_model.embeddings.position_embedding.detach(), bigger // patch)
    assert torch.equal(started.vision_model.embeddings.position_embedding.detach(), expected)


def test_vision_init_that_does_not_fit_is_refused_in_one_line(tmp_path):
    source, _ = build_model(_tiny(tmp_path, vision_width=48, vision_heads=2))
    path = tmp_path / "vision.safetensors"
    save_file({f"vision_model.{k}": v.contiguous() for k, v in _vision(source).items()}, str(path))
    with pytest.raises(ModelInitError, match="shapes differ") as e:
        build_model(_tiny(tmp_path, vision_init=str(path)))
    assert "\n" not in str(e.value) and "vision_init=" in str(e.value)
    text_only = tmp_path / "text.safetensors"
    save_file({"text_encoder.embeddings.word_embeddings.weight": torch.zeros(4, 4)}, str(text_only))
    with pytest.raises(CheckpointError, match="no image encoder"):
        build_model(_tiny(tmp_path, vision_init=str(text_only)))
    distilled = tmp_path / "deit_distilled.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "dist_token": torch.zeros(1, 1, 8)}, distilled)
    with pytest.raises(CheckpointError, match="dist_token"):
        build_model(_tiny(tmp_path, vision_init=str(distilled)))
    with pytest.raises(ConfigError, match="vision_init"):
        _tiny(tmp_path, vision_init=str(path), init=str(path))


CLASSES = {"red": 2, "green": 3}


def _separable(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two labels a ViT learns at once: noise images whose red channel is dark or bright (`red`), and whose green
    channel is dark, grey or bright (`green`)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randint(0, 2, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)], dim=1)
    pixels = torch.randn(n, 3, size, size, generator=g) * 0.5
    pixels[:, 0] += labels[:, :1, None].float() * 2 - 1
    pixels[:, 1] += labels[:, 1:, None].float() * 1.5 - 1.5
    return pixels, labels


def test_pretrain_vision_learns_its_labels_and_writes_a_vision_init(tmp_path):
    model_cfg = _tiny(tmp_path, pos_init="sincos")
    size = build_model(model_cfg)[0].vision_model.config.image_size
    cfg = VisionPretrainConfig(images=64, eval_images=64, steps=40, batch_size=16, lr=1e-3, warmup_steps=3)
    train, test = _separable(64, size, 0), _separable(64, size, 1)
    result = pretrain_vision(model_cfg, cfg, train, test, CLASSES, tmp_path / "vision", seed=0, progress=False)
    for label in CLASSES:
        assert result["accuracy"][label] >= 0.9 > result["chance"][label], label
    assert result["loss"] < result["first_loss"]
    assert (tmp_path / "vision" / "vision.json").is_file()
    started, _ = build_model(_tiny(tmp_path, vision_init=result["path"]))
    fresh, _ = build_model(model_cfg)
    moved = started.vision_model.embeddings.patch_embedding.weight
    assert not torch.equal(moved, fresh.vision_model.embeddings.patch_embedding.weight)  # trained weights, loaded
    # the same seed, the same weights
    again = pretrain_vision(model_cfg, cfg, train, test, CLASSES, tmp_path / "again", seed=0, progress=False)
    assert again["loss"] == result["loss"]
    with pytest.raises(ValueError, match="steps"):
        VisionPretrainConfig(steps=0)
    with pytest.raises(ValueError, match="outside its classes"):
        pretrain_vision(model_cfg, cfg, (train[0], train[1] * 2), test, CLASSES, tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="a row of 2 labels"):
        pretrain_vision(model_cfg, cfg, (train[0], train[1][:, 0]), test, CLASSES, tmp_path / "bad", progress=False)


def test_pretrain_vision_learns_labels_of_patches(tmp_path):
    """`[N, T, L]` labels train a head on every patch token; accuracy counts the patches whose class is not 0."""
    model_cfg = _tiny(tmp_path, pos_init="sincos")
    config = build_model(model_cfg)[0].vision_model.config
    size, patch = config.image_size, config.patch_size
    grid = size // patch

    def bright_patches(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise images; label "lit" is 1 on patches whose red channel is bright (else 0, nothing there) and
        "side" says which half of the image a lit patch is in (1 left, 2 right; 0 where unlit)."""
        g = torch.Generator().manual_seed(seed)
        lit = torch.rand(n, grid, grid, generator=g) < 0.3
        pixels = torch.randn(n, 3, size, size, generator=g) * 0.3
        pixels[:, 0] += lit.repeat_interleave(patch, 1).repeat_interleave(patch, 2).float() * 3 - 1
        side = (torch.arange(grid) >= grid // 2).long().expand(n, grid, grid) + 1
        labels = torch.stack([lit.long(), lit.long() * side], dim=-1)
        return pixels, labels.reshape(n, grid * grid, 2)

    cfg = VisionPretrainConfig(images=64, eval_images=32, steps=60, batch_size=16, lr=2e-3, warmup_steps=3)
    classes = {"lit": 2, "side": 3}
    train, test = bright_patches(64, 0), bright_patches(32, 1)
    result = pretrain_vision(model_cfg, cfg, train, test, classes, tmp_path / "vision", seed=0, progress=False)
    assert result["labels"] == "patches"
    assert result["accuracy"]["lit"] >= 0.9 and result["accuracy"]["side"] >= 0.9 > result["chance"]["side"]
    assert result["chance"]["lit"] == 1.0  # among lit patches "lit" is the only class: chance is no bar there
    assert result["loss"] < result["first_loss"]
    with pytest.raises(ValueError, match=rf"\[{grid * grid}, 2\] labels per image"):
        pretrain_vision(model_cfg, cfg, (train[0], train[1][:, :-1]), test, classes, tmp_path / "bad", progress=False)
