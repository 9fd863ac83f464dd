"""Helpers shared by the training tests."""

from __future__ import annotations

from pathlib import Path

from blip.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def tiny_config(task: str, data: Path, out_dir: Path, **changes) -> TrainConfig:
    """The blip_test preset (32 px, 2+2 layers) on the shapes vocabulary; a few steps of everything."""
    base = TrainConfig(
        task=task,
        data=str(data),
        out_dir=str(out_dir),
        batch_size=8,
        max_steps=4,
        queue_size=32,
        lr=3e-4,
        warmup_steps=1,
        log_every=1,
        augment=False,
        threads=1,
        seed=1,
        save_hf=False,
    )
    return base.replace(**changes)


def as_overrides(cfg: TrainConfig) -> list[str]:
    """`key=value` arguments that rebuild `cfg` on the command line."""
    out = []
    for key, value in cfg.to_dict().items():
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        out.append(f"{key}={value}")
    return out
