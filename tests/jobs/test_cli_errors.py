"""Counts that are zero or negative, and inputs with nothing in them, are one line naming the problem and exit 2: in
`blip batch`, `blip capfilt`, `blip caption|vqa|match|similarity` and `blip retrieve` (issue 15.7)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from jobs_helpers import one_line

from blip.capfilt.cli import capfilt_main
from blip.cli import main
from blip.jobs.cli import batch_main, retrieve_main

BLIP = str(Path(sys.executable).parent / "blip")

# every integer (and count-like) flag of the job commands, with a value it must refuse
BATCH_FLAGS = [
    ("--batch-size", "0"),
    ("--batch-size", "-3"),
    ("--shard-size", "0"),
    ("--workers", "-1"),
    ("--prefetch", "-1"),
    ("--limit", "0"),
    ("--limit", "-5"),
    ("--num-workers", "0"),
    ("--cpus-per-worker", "0"),
    ("--gpus-per-worker", "-1"),
    ("--dist-timeout", "0"),
]
CAPFILT_FLAGS = [
    ("--batch-size", "0"),
    ("--shard-size", "-1"),
    ("--workers", "-1"),
    ("--num-captions", "0"),
    ("--max-new-tokens", "0"),
    ("--threads", "-1"),
    ("--num-workers", "0"),
    ("--dist-timeout", "-5"),
]


@pytest.mark.parametrize("flag, value", BATCH_FLAGS)
def test_batch_counts(caption_model, image_folder, tmp_path, capsys, flag, value):
    folder, _, _ = image_folder
    argv = ["caption", "-m", str(caption_model), "-i", str(folder), "-o", str(tmp_path / "o"), flag, value]
    assert batch_main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"blip batch caption: error: {flag} must be ") and line.endswith(f"got {value}"), line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value", CAPFILT_FLAGS)
def test_capfilt_counts(caption_model, retrieval_model, image_folder, tmp_path, capsys, flag, value):
    folder, _, _ = image_folder
    argv = ["--captioner", str(caption_model), "--filter", str(retrieval_model), "--data", str(folder)]
    assert capfilt_main([*argv, "--out", str(tmp_path / "o"), flag, value]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"blip capfilt: error: {flag} must be ") and line.endswith(f"got {value}"), line


@pytest.mark.parametrize("command", ["caption", "vqa", "match", "similarity"])
def test_single_commands_batch_size(command, tmp_path, capsys):
    inputs = {
        "caption": ["a.png"],
        "vqa": ["--image", "a.png", "--question", "q?"],
        "match": ["--image", "a.png", "--text", "t"],
        "similarity": ["--image", "a.png", "--text", "t"],
    }[command]
    for value in ("0", "-2"):
        assert main([command, "-m", str(tmp_path / "never-read"), *inputs, "--batch-size", value]) == 2
        assert one_line(capsys.readouterr().err) == f"blip {command}: error: --batch-size must be >= 1, got {value}"


@pytest.mark.parametrize("flag", ["--threads", "--processes"])
def test_demo_counts(tmp_path, capsys, flag):
    assert main(["demo", "--smoke", "--out", str(tmp_path / "never-written"), flag, "0"]) == 2
    assert one_line(capsys.readouterr().err) == f"blip demo: error: {flag} must be >= 1, got 0"
    assert not (tmp_path / "never-written").exists()


@pytest.mark.parametrize("flag", ["--top-k", "--nprobe", "--ef-search"])
def test_retrieve_counts(tmp_path, capsys, flag):
    assert retrieve_main(["a dog", "--index", str(tmp_path), flag, "0"]) == 2
    assert one_line(capsys.readouterr().err) == f"blip retrieve: error: {flag} must be >= 1, got 0"


def test_empty_inputs_name_what_was_looked_for(caption_model, tmp_path):
    """Through the real `blip` command: an empty folder, a manifest without rows, and --batch-size 0."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("not an image")
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("\n")
    job = ["batch", "caption", "-m", str(caption_model), "--out", str(tmp_path / "o")]
    runs = {
        "folder": [*job, "-i", str(empty)],
        "manifest": [*job, "-i", str(manifest)],
        "batch size": [*job, "-i", str(empty), "--batch-size", "0"],
    }
    procs = {name: subprocess.Popen([BLIP, *argv], stderr=subprocess.PIPE, text=True) for name, argv in runs.items()}
    lines = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        lines[name] = err.strip()
    folder = lines["folder"]
    assert folder.startswith(f"blip batch caption: error: --input {empty}: no images found")
    assert ".jpg" in folder and ".png" in folder and "--extensions" in folder and "1 other files were skipped" in folder
    assert lines["manifest"] == (
        f"blip batch caption: error: --input {manifest}: the manifest has no rows (no record in the file)"
    )
    assert lines["batch size"] == "blip batch caption: error: --batch-size must be >= 1, got 0"
    assert not (tmp_path / "o").exists()


def test_capfilt_of_an_empty_folder(caption_model, retrieval_model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--captioner", str(caption_model), "--filter", str(retrieval_model), "--data", str(empty)]
    assert capfilt_main([*argv, "--out", str(tmp_path / "o")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"blip capfilt: error: --data {empty}: no images found (looked for files ending .jpg")
    assert not (tmp_path / "o").exists()
