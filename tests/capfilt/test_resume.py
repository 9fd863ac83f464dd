"""A CapFilt run that dies part-way (SIGKILL, or an error that escapes) and is rerun gives byte-identical records and
dataset to a run that never stopped: nothing lost, nothing duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from capfilt_helpers import records_bytes

from blip.capfilt import DATASET, CapfiltConfig, read_records, run_capfilt
from blip.capfilt.cli import capfilt_main
from blip.capfilt.core import CapfiltRunner

torch.set_num_threads(1)


class Killed(BaseException):
    """Stands for the process dying: not an `Exception`, so no row-level recovery catches it."""


def test_injected_crash_mid_shard_then_resume_equals_uninterrupted(models, shapes_dir, tmp_path, monkeypatch):
    captioner, filter_ = models
    cfg = CapfiltConfig(batch_size=3, shard_size=9, max_new_tokens=8, num_captions=2, keep_clean=str(shapes_dir))
    reference = tmp_path / "reference"
    run_capfilt(captioner, filter_, shapes_dir, reference, cfg, progress=False)

    out = tmp_path / "crashed"
    calls = {"n": 0}
    infer = CapfiltRunner._infer

    def dying(self, rows, decoded):
        calls["n"] += 1
        if calls["n"] == 5:  # shard 0 (3 batches) committed, shard 1 has one batch journaled
            raise Killed
        return infer(self, rows, decoded)

    monkeypatch.setattr(CapfiltRunner, "_infer", dying)
    with pytest.raises(Killed):
        run_capfilt(captioner, filter_, shapes_dir, out, cfg, progress=False)
    assert len(list((out / "_receipts").glob("*.json"))) == 1 and list((out / "_work").glob("*.journal"))
    assert not (out / DATASET).exists()
    monkeypatch.setattr(CapfiltRunner, "_infer", infer)

    resumed = run_capfilt(captioner, filter_, shapes_dir, out, cfg, progress=False)
    assert resumed.resumed and resumed.complete
    assert records_bytes(out) == records_bytes(reference)
    assert (out / DATASET).read_bytes() == (reference / DATASET).read_bytes()
    assert (out / "errors.jsonl").read_bytes() == (reference / "errors.jsonl").read_bytes()
    assert len(list(read_records(out))) == 24
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.journal"))


def _receipts(out: Path) -> int:
    folder = out / "_receipts"
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def test_sigkill_then_rerun_equals_uninterrupted(model_dirs, shapes_dir, tmp_path):
    captioner, filter_ = model_dirs
    args = ["--captioner", str(captioner), "--filter", str(filter_), "--data", str(shapes_dir)]
    args += ["--batch-size", "1", "--shard-size", "2", "--num-captions", "2", "--threads", "1", "--workers", "0"]
    args += ["--max-new-tokens", "20", "--min-new-tokens", "20", "--no-progress"]  # slow enough to be killed

    reference = tmp_path / "reference"
    assert capfilt_main([*args, "--out", str(reference)]) == 0

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "blip.capfilt", *args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and _receipts(out) == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = _receipts(out)
    assert 1 <= done < 12 and not (out / DATASET).exists()

    assert capfilt_main([*args, "--out", str(out)]) == 0  # the rerun resumes
    assert records_bytes(out) == records_bytes(reference)
    assert (out / DATASET).read_bytes() == (reference / DATASET).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
