"""kill -9 at random moments with a tiny BLIP-2 (OPT) captioner, rerun until done: the output equals an uninterrupted
run, byte for byte (the same helper as the BLIP kill test)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from jobs_helpers import kill_until_done, read_errors, read_rows

from blip.jobs.cli import batch_main
from oracle import make_images
from oracle_blip2 import Blip2Spec, build_blip2_checkpoint

pytest.importorskip("transformers")

N_IMAGES = 240


def test_kill_9_and_resume_equals_uninterrupted_run_blip2(tmp_path):
    model = build_blip2_checkpoint(tmp_path / "opt", Blip2Spec(kind="opt", seed=41))
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(make_images(N_IMAGES, seed=12)):
        image.save(folder / f"{i:04d}.{'jpg' if i % 3 else 'png'}")
    (folder / "0017.jpg").write_bytes(b"")  # two bad rows among them
    (folder / "0102.png").write_bytes((folder / "0099.png").read_bytes()[:100])
    args = ["caption", "--model", str(model), "--input", str(folder), "--batch-size", "1", "--shard-size", "30"]
    args += ["--prompt", "a photo of", "--num-beams", "4", "--min-new-tokens", "20", "--max-new-tokens", "20"]
    args += ["--no-progress"]

    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed runs (OMP_NUM_THREADS=1): the scores' last bits follow the thread count
    try:
        assert batch_main([*args, "--out", str(reference)]) == 1
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "blip.jobs", "batch", *args, "--out", str(out)]
    kills = kill_until_done(command, out, seed=4321)
    assert kills >= 3, "the job finished too quickly to be killed mid-way"

    assert read_rows(out) == read_rows(reference)  # same rows, same order, same scores: no loss, no duplicates
    assert read_errors(out) == read_errors(reference) and len(read_errors(out)) == 2
    ref_files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ref_files
    for name in ref_files:
        if name.startswith("part-"):
            assert (out / name).read_bytes() == (reference / name).read_bytes()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["shards"] == json.loads((reference / "_manifest.json").read_text())["shards"]
    assert manifest["rows_ok"] == N_IMAGES - 2 and manifest["complete"]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.journal"))
