"""kill -9 at random moments with a tiny BLIP-2 (OPT) captioner, rerun until done: the output equals an uninterrupted
run, byte for byte (the same helper as the BLIP kill test)."""

from __future__ import annotations

import json
import sys

import pytest
from jobs_helpers import assert_same_output, batch_main_one_thread, kill_until_done, numbered_folder, read_errors

from oracle_blip2 import Blip2Spec, build_blip2_checkpoint

pytest.importorskip("transformers")

N_IMAGES = 240


def test_kill_9_and_resume_equals_uninterrupted_run_blip2(tmp_path):
    model = build_blip2_checkpoint(tmp_path / "opt", Blip2Spec(kind="opt", seed=41))
    folder = numbered_folder(tmp_path / "images", N_IMAGES, seed=12)
    (folder / "0017.jpg").write_bytes(b"")  # two bad rows among them
    (folder / "0102.png").write_bytes((folder / "0099.png").read_bytes()[:100])
    args = ["caption", "--model", str(model), "--input", str(folder), "--batch-size", "1", "--shard-size", "30"]
    args += ["--prompt", "a photo of", "--num-beams", "4", "--min-new-tokens", "20", "--max-new-tokens", "20"]
    args += ["--no-progress"]

    reference = tmp_path / "reference"
    assert batch_main_one_thread([*args, "--out", str(reference)]) == 1

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "blip.jobs", "batch", *args, "--out", str(out)]
    kills = kill_until_done(command, out, seed=4321)
    assert kills >= 3, "the job finished too quickly to be killed mid-way"

    assert_same_output(out, reference)
    assert len(read_errors(out)) == 2
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows_ok"] == N_IMAGES - 2 and manifest["complete"]
