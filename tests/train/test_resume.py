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
from torch import nn
from train_helpers import as_overrides, tiny_config

from blip.distributed import DistInfo
from blip.train.loop import LoopSettings, Trainer
from blip.train.optim import LRSchedule
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


def _start_and_kill(cfg, ready) -> None:
    """Run `cfg` with `blip train` in a subprocess and SIGKILL it once `ready()` holds (it must still be running)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "blip.train.cli", *as_overrides(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_then_resume_is_exact(tmp_path, shapes_dir):
    """A real process killed with SIGKILL mid-run (checkpoints every step) resumes to the same weights."""
    cfg = tiny_config("caption", shapes_dir, tmp_path / "full", max_steps=30, ckpt_every=1, batch_size=4)
    assert run(cfg).finished
    metrics = tmp_path / "killed" / "metrics.jsonl"
    _start_and_kill(
        cfg.replace(out_dir=str(tmp_path / "killed")),
        lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3,
    )
    killed_at = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"]
    assert 1 <= killed_at < 30
    resumed = run(cfg.replace(out_dir=str(tmp_path / "killed")))
    assert resumed.finished
    _assert_same_checkpoint(tmp_path / "full" / "checkpoint.pt", tmp_path / "killed" / "checkpoint.pt")
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "killed")


def test_sigkill_between_timed_checkpoints_then_resume_is_exact(tmp_path, shapes_dir):
    """Checkpoints by time only (`ckpt_every_s`; one 60-step epoch, so the old epoch-end rule would have none
    before the end): a run killed mid-epoch resumes from a timed checkpoint and ends exactly like an uninterrupted
    run."""
    cfg = tiny_config("caption", shapes_dir, tmp_path / "full", max_steps=60, batch_size=4, ckpt_every_s=0.2)
    assert run(cfg).finished
    killed = cfg.replace(out_dir=str(tmp_path / "killed"))
    checkpoint, metrics = tmp_path / "killed" / "checkpoint.pt", tmp_path / "killed" / "metrics.jsonl"

    def ready() -> bool:  # a timed checkpoint exists, and steps were done after it
        if not checkpoint.is_file() or not metrics.is_file():
            return False
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")]
        return bool(steps) and steps[-1] > load_checkpoint(checkpoint)["step"]

    _start_and_kill(killed, ready)
    killed_at = load_checkpoint(checkpoint)["step"]
    assert 1 <= killed_at < 60
    resumed = run(killed)
    assert resumed.finished
    _assert_same_checkpoint(tmp_path / "full" / "checkpoint.pt", checkpoint)
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "killed")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _ToyTask(nn.Module):
    """Each step takes one second of `clock`."""

    def __init__(self, clock: _Clock):
        super().__init__()
        self.model, self.clock = nn.Linear(2, 1), clock

    def before_step(self, step: int) -> None:
        self.clock.now += 1.0

    def forward(self, batch: dict) -> dict:
        return {"loss": self.model(batch["x"]).pow(2).mean()}


class _ToyData:
    micro_batches_per_epoch = 1000

    def batches(self, epoch: int, start: int):
        while True:
            yield {"x": torch.ones(4, 2)}


@pytest.mark.parametrize(("write_seconds", "expected"), [(0.0, [5, 10, 15, 20, 23]), (1.0, [5, 23])])
def test_timed_checkpoints_follow_the_clock(tmp_path, write_seconds, expected):
    """`ckpt_every_s=5` with one-second steps: a checkpoint every 5 steps and at the end; a write that takes a second
    stretches the interval to 20 writes (20 s), so writing never takes more than 1/20 of the time."""
    clock = _Clock()
    task = _ToyTask(clock)
    saved: list[int] = []

    def on_checkpoint(state) -> None:
        saved.append(state.step)
        clock.now += write_seconds

    trainer = Trainer(
        task,
        torch.optim.SGD(task.parameters(), lr=0.1),
        LRSchedule(0.1, 23),
        _ToyData(),
        LoopSettings(total_steps=23, log_every=100, ckpt_every_s=5.0, desc="toy"),
        out_dir=tmp_path,
        dist=DistInfo(),
        on_checkpoint=on_checkpoint,
        clock=clock,
    )
    result = trainer.fit()
    assert result.finished and result.state.step == 23
    assert saved == expected


def test_progress_bar_shows_the_label_steps_and_eta(tmp_path, capsys):
    clock = _Clock()
    task = _ToyTask(clock)
    settings = LoopSettings(total_steps=7, log_every=100, desc="demo 3/10 pretrain_web")
    trainer = Trainer(
        task,
        torch.optim.SGD(task.parameters(), lr=0.1),
        LRSchedule(0.1, 7),
        _ToyData(),
        settings,
        out_dir=tmp_path,
        dist=DistInfo(),
        clock=clock,
    )
    assert trainer.fit().finished
    assert "demo 3/10 pretrain_web: 7/7 steps, ETA 00:00 (" in capsys.readouterr().err


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
