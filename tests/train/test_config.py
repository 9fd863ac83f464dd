"""Run configs: typed overrides, validation, config files as code (every file in configs/ loads, smoke shrinks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blip.train.config import ConfigError, TrainConfig, apply_overrides, load_config_file, resolve_config
from blip.train.optim import LRSchedule, param_groups

# training recipes; configs/demo_*.py describe the demo's stages instead (tests/test_demo.py loads them)
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.py") if p.stem != "demo_shapes")


def test_overrides_are_typed_against_the_dataclass():
    cfg = apply_overrides(
        TrainConfig(),
        {
            "lr": "2e-4",
            "batch_size": "16",
            "max_steps": "1_000",
            "hflip": "false",
            "crop_scale": "0.8,1.0",
            "task": "vqa",
            "prompt": "a photo of ",
            "shapes_counts": "(1, 2, 3, 4)",
        },
    )
    assert cfg.lr == 2e-4 and cfg.batch_size == 16 and cfg.max_steps == 1000 and cfg.hflip is False
    assert cfg.crop_scale == (0.8, 1.0) and cfg.task == "vqa" and cfg.prompt == "a photo of "
    assert cfg.shapes_counts == (1, 2, 3, 4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"lrr": "1"}, "unknown config key 'lrr' \\(did you mean lr"),
        ({"batch_size": "lots"}, "expected an integer"),
        ({"hflip": "maybe"}, "expected a boolean"),
        ({"task": "visdial"}, "expected one of pretrain, caption, vqa, retrieval, nlvr"),
        ({"crop_scale": "0.5"}, "expected 2 comma-separated values"),
        ({"batch_size": "0"}, "batch_size must be >= 1"),
        ({"momentum": "1.5"}, "momentum must be in"),
        ({"temp": "0.9"}, "temp must be in"),
    ],
)
def test_bad_overrides_are_explained(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), override)


def test_round_trip_through_a_checkpoint_dict():
    cfg = TrainConfig(crop_scale=(0.2, 1.0), task="retrieval")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_loads_and_smoke_shrinks_it(path):
    full = load_config_file(path)
    smoke = load_config_file(path, smoke=True)
    assert path.stem.split("_")[0] == full.task
    assert smoke.smoke and not full.smoke
    assert smoke.task == full.task
    assert (smoke.max_steps or 10**9) <= 200 and smoke.max_steps < (full.max_steps or 10**9)
    assert "train --config configs/" in load_module_doc(path)  # the command is in the docstring


def load_module_doc(path: Path) -> str:
    import ast

    return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_resolve_config_passes_smoke_to_the_file_first(tmp_path):
    config = tmp_path / "my_run.py"
    config.write_text(
        "from blip.train.config import TrainConfig\n"
        "def get_config(smoke=False):\n"
        "    return TrainConfig(task='caption', max_steps=5 if smoke else 500)\n"
    )
    cfg = resolve_config(str(config), ["smoke=true", "lr=1e-3"])
    assert cfg.max_steps == 5 and cfg.smoke and cfg.lr == 1e-3
    with pytest.raises(ConfigError, match="defines no get_config"):
        (tmp_path / "bad.py").write_text("x = 1\n")
        load_config_file(tmp_path / "bad.py")
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.py")


def test_schedule_and_parameter_groups():
    schedule = LRSchedule(1e-3, total_steps=110, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5)
    assert schedule(0) == pytest.approx(1e-6)
    assert schedule(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert schedule(10) == pytest.approx(1e-3)
    assert schedule(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert schedule(110) == pytest.approx(1e-5)
    assert LRSchedule(1e-3, 100, kind="constant")(99) == 1e-3

    import torch

    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    module.append(frozen)
    groups = param_groups(module, 0.05, decay_1d=False)
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["weight_decay"] == 0.0
    assert [len(g["params"]) for g in param_groups(module, 0.05, decay_1d=True)] == [4]
