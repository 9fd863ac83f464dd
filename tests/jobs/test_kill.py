"""kill -9 at random moments, rerun until done: the output equals an uninterrupted run, row for row."""

from __future__ import annotations

import json
import sys

from jobs_helpers import assert_same_output, batch_main_one_thread, kill_until_done, numbered_folder

N_IMAGES = 300


def test_kill_9_and_resume_equals_uninterrupted_run(caption_model, tmp_path):
    folder = numbered_folder(tmp_path / "images", N_IMAGES, seed=11)
    (folder / "0041.jpg").write_bytes(b"")  # two bad rows among them
    (folder / "0138.png").write_bytes((folder / "0135.png").read_bytes()[:100])
    args = ["caption", "--model", str(caption_model), "--input", str(folder), "--batch-size", "2", "--shard-size", "40"]
    args += ["--num-beams", "4", "--min-new-tokens", "20", "--max-new-tokens", "20", "--no-progress"]  # slow enough

    reference = tmp_path / "reference"
    assert batch_main_one_thread([*args, "--out", str(reference)]) == 1

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "blip.jobs", "batch", *args, "--out", str(out)]
    kills = kill_until_done(command, out, seed=1234)  # the last run exits 1: some rows failed (the two bad images)
    assert kills >= 3, "the job finished too quickly to be killed mid-way"

    assert_same_output(out, reference)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows_ok"] == N_IMAGES - 2 and manifest["rows_failed"] == 2
