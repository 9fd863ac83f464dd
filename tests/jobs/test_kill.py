"""kill -9 at random moments, rerun until done: the output equals an uninterrupted run, row for row."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from jobs_helpers import read_errors, read_rows

from blip.jobs.cli import batch_main
from oracle import make_images

N_IMAGES = 300


def _progress(out: Path) -> int:
    """Batches journaled plus shards committed so far (0 before the first batch is done)."""
    journals = sum(p.read_bytes().count(b"\n") - 1 for p in (out / "_work").glob("*.journal")) if out.exists() else 0
    receipts = len(list((out / "_receipts").glob("*.json"))) if (out / "_receipts").exists() else 0
    return max(journals, 0) + receipts


def test_kill_9_and_resume_equals_uninterrupted_run(caption_model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(make_images(N_IMAGES, seed=11)):
        image.save(folder / f"{i:04d}.{'jpg' if i % 3 else 'png'}")
    (folder / "0041.jpg").write_bytes(b"")  # two bad rows among them
    (folder / "0138.png").write_bytes((folder / "0135.png").read_bytes()[:100])
    args = ["caption", "--model", str(caption_model), "--input", str(folder), "--batch-size", "2", "--shard-size", "40"]
    args += ["--num-beams", "4", "--min-new-tokens", "20", "--max-new-tokens", "20", "--no-progress"]  # slow enough

    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed runs (OMP_NUM_THREADS=1): the scores' last bits follow the thread count
    try:
        assert batch_main([*args, "--out", str(reference)]) == 1
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "blip.jobs", "batch", *args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    rng = random.Random(1234)
    kills, finished = 0, False
    for _ in range(5):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = _progress(out)
        deadline = time.monotonic() + 60
        while proc.poll() is None and _progress(out) == start and time.monotonic() < deadline:
            time.sleep(0.02)  # wait until this run has done some work of its own
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            finished = True
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += proc.returncode == -signal.SIGKILL
    if not finished:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr  # 1: some rows failed (the two bad images)
    assert kills >= 3, "the job finished too quickly to be killed mid-way"

    assert read_rows(out) == read_rows(reference)  # same rows, same order, same scores: no loss, no duplicates
    assert read_errors(out) == read_errors(reference)
    ref_files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ref_files
    for name in ref_files:
        if name.startswith("part-"):
            assert (out / name).read_bytes() == (reference / name).read_bytes()
    manifest = json.loads((out / "_manifest.json").read_text())
    ref_manifest = json.loads((reference / "_manifest.json").read_text())
    assert manifest["shards"] == ref_manifest["shards"]
    assert manifest["rows_ok"] == N_IMAGES - 2 and manifest["rows_failed"] == 2
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.journal"))
