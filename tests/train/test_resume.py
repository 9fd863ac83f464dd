"""Kill-and-resume: a run interrupted after step k and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import as_overrides, tiny_config

from blip.train.recipe import run
from blip.weights.checkpoint import atomic_save, load_checkpoint


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, f"{what}: {key} differs"


def _assert_same_checkpoint(path_a, path_b) -> None:
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["step"] == b["step"]
    _assert_same_state(a["model"], b["model"], "model")
    _assert_same_state(a["task_state"], b["task_state"], "task state (momentum encoders, queues, temperature)")
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[key], sb[key])


def _metrics(folder) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("steps_per_s")
    return rows


@pytest.mark.parametrize(("task", "data"), [("pretrain", ""), ("vqa", ""), ("pretrain", "web-*.tar")])
def test_stop_and_resume_is_exact(tmp_path, shapes_dir, task, data):
    # Augmentation, dropout and gradient accumulation on, so every source of randomness must be restored.
    changes = {"augment": True, "hflip": True, "randaugment": True, "dropout": 0.1, "drop_path": 0.1}
    source = shapes_dir / data if data else shapes_dir  # a folder's manifest, or WebDataset shards
    cfg = tiny_config(task, source, tmp_path / "full", max_steps=5, grad_accum=2, batch_size=4, **changes)
    assert run(cfg).finished
    interrupted = cfg.replace(out_dir=str(tmp_path / "resumed"), stop_after=2)
    first = run(interrupted)
    assert not first.finished and first.step == 2
    second = run(interrupted.replace(stop_after=0))
    assert second.finished and second.step == 5
    _assert_same_checkpoint(tmp_path / "full" / "checkpoint.pt", tmp_path / "resumed" / "checkpoint.pt")
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "resumed")


def test_sigkill_then_resume_is_exact(tmp_path, shapes_dir):
    """A real process killed with SIGKILL mid-run (checkpoints every step) resumes to the same weights."""
    cfg = tiny_config("caption", shapes_dir, tmp_path / "full", max_steps=30, ckpt_every=1, batch_size=4)
    assert run(cfg).finished
    args = as_overrides(cfg.replace(out_dir=str(tmp_path / "killed")))
    command = [sys.executable, "-m", "blip.train.cli", *args]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"]
    assert 1 <= killed_at < 30
    resumed = run(cfg.replace(out_dir=str(tmp_path / "killed")))
    assert resumed.finished
    _assert_same_checkpoint(tmp_path / "full" / "checkpoint.pt", tmp_path / "killed" / "checkpoint.pt")
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "killed")


def test_atomic_save_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"format": "blip-train-checkpoint", "step": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"format": "blip-train-checkpoint", "step": 2, "bad": Boom()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
