"""The bootstrapped dataset trains: `blip train` (pretrain task) runs on `<out>/bootstrap.jsonl` as its data."""

from __future__ import annotations

import json

import torch

from blip.capfilt import DATASET, CapfiltConfig, run_capfilt
from blip.train.config import TrainConfig
from blip.train.recipe import run

torch.set_num_threads(1)


def test_pretrain_runs_on_the_bootstrapped_dataset(models, shapes_dir, tmp_path, monkeypatch):
    captioner, filter_ = models
    out = tmp_path / "capfilt"
    monkeypatch.chdir(shapes_dir.parent)  # relative paths in must still give paths the trainer finds
    clean = shapes_dir.name  # the data and the clean split, both relative
    cfg = CapfiltConfig(threshold=0.0, batch_size=8, max_new_tokens=6, keep_clean=clean)
    summary = run_capfilt(captioner, filter_, clean, out, cfg, progress=False)
    train = TrainConfig(
        task="pretrain",
        data=str(out / DATASET),
        out_dir=str(tmp_path / "pretrain"),
        preset="blip_test",
        batch_size=8,
        max_steps=2,
        queue_size=32,
        warmup_steps=1,
        log_every=1,
        augment=False,
        threads=1,
        save_hf=False,
    )
    assert summary.texts_out == 24 + 24 + 30  # every web and synthetic text kept, plus the clean captions
    result = run(train)
    assert result.finished and result.step == 2 and result.skipped == {}  # every row's image was found
    assert json.loads((tmp_path / "pretrain" / "config.json").read_text())["data"] == str(out / DATASET)
