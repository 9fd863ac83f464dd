"""Shared helpers of the batch-job tests: tiny model specs, an image folder with bad files, output readers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from blip.jobs import BatchConfig, run_batch
from blip.jobs.cli import batch_main
from oracle import TinySpec, make_images

CAPTION = TinySpec(kind="caption", seed=81)
VQA = TinySpec(kind="vqa", seed=82)
RETRIEVAL = TinySpec(kind="retrieval", seed=83)

# name -> what its error must mention
BAD_FILES = {
    "bad/corrupt.png": "corrupt",
    "bad/truncated.jpg": "truncated",
    "bad/empty.png": "empty file",
    "bad/not_an_image.jpg": "not an image",
}


def make_folder(root: Path, n_good: int = 14, seed: int = 3) -> tuple[list[str], dict[str, str]]:
    """Good images (png/jpg, some in a subfolder) plus corrupt, truncated, zero-byte and non-image files.
    Returns (good ids, {bad id: expected reason fragment}); ids are paths relative to `root`."""
    good = []
    for i, image in enumerate(make_images(n_good, seed=seed)):
        rel = f"{'sub/' if i % 3 == 0 else ''}img{i:03d}.{'png' if i % 2 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel)
        good.append(rel)
    (root / "bad").mkdir(parents=True, exist_ok=True)
    png = next(g for g in good if g.endswith(".png"))
    data = bytearray((root / png).read_bytes())
    data[120:400] = bytes(range(256)) + bytes(24)  # pixel data scrambled, header intact
    (root / "bad/corrupt.png").write_bytes(bytes(data))
    (root / "bad/truncated.jpg").write_bytes((root / good[0]).read_bytes()[:300])
    (root / "bad/empty.png").write_bytes(b"")
    (root / "bad/not_an_image.jpg").write_text("this is a text file with an image name\n")
    (root / "notes.txt").write_text("not an image and not named like one: skipped\n")
    (root / ".hidden.png").write_bytes(b"hidden files are skipped")
    return sorted(good), dict(BAD_FILES)


def numbered_folder(folder: Path, n: int, seed: int) -> Path:
    """`n` images named 0000.png, 0001.jpg, ... (every third one a PNG) in a new `folder` (the kill tests' input)."""
    folder.mkdir()
    for i, image in enumerate(make_images(n, seed=seed)):
        image.save(folder / f"{i:04d}.{'jpg' if i % 3 else 'png'}")
    return folder


def read_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("part-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def assert_same_rows(rows: list[dict], reference: list[dict], rel: float = 1e-5) -> None:
    """Row for row the same: every text field equal, float scores equal to float32 rounding. Scores may move in the
    last bits with the thread count (a torchrun rank or Ray actor runs 1 thread, the reference 2)."""
    assert len(rows) == len(reference)
    for row, ref in zip(rows, reference):
        assert row.keys() == ref.keys()
        for key, value in row.items():
            if isinstance(value, float):
                assert value == pytest.approx(ref[key], rel=rel, abs=1e-6), (key, row, ref)
            else:
                assert value == ref[key], (key, row, ref)


def run_embed(model: Path, folder: Path, out: Path, embed_format: str):
    """An embed job over `folder` (batches of 4, shards of 5, no progress bar); returns its `BatchResult`."""
    cfg = BatchConfig(
        task="embed",
        model=str(model),
        input=str(folder),
        out=str(out),
        batch_size=4,
        shard_size=5,
        embed_format=embed_format,
        progress=False,
    )
    return run_batch(cfg)


def read_vectors(out: Path, embed_format: str) -> list[np.ndarray]:
    """The embedding shards of an embed job, in order ("npy" or "safetensors")."""
    shards = sorted(out.glob(f"part-*.{embed_format}"))
    if embed_format == "npy":
        return [np.load(path) for path in shards]
    from safetensors.numpy import load_file

    return [load_file(str(path))["embeddings"] for path in shards]


def read_errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines() if line.strip()]


def one_line(err: str) -> str:
    """The error a command printed: exactly one line on stderr, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under `root`."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def progress(out: Path) -> int:
    """Batches journaled plus shards committed so far (0 before the first batch is done)."""
    journals = sum(p.read_bytes().count(b"\n") - 1 for p in (out / "_work").glob("*.journal")) if out.exists() else 0
    receipts = len(list((out / "_receipts").glob("*.json"))) if (out / "_receipts").exists() else 0
    return max(journals, 0) + receipts


def kill_until_done(command: list[str], out: Path, *, seed: int, tries: int = 5, rc: int = 1) -> int:
    """Run `command` (a job writing to `out`) `tries` times, each killed with SIGKILL at a random moment after it
    has done some work of its own, then once to the end, which must exit with `rc`. Returns how many runs died by
    the kill (a run may finish first: then no further runs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    rng = random.Random(seed)
    kills = 0
    for _ in range(tries):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = progress(out)
        deadline = time.monotonic() + 60
        while proc.poll() is None and progress(out) == start and time.monotonic() < deadline:
            time.sleep(0.02)  # wait until this run has done some work of its own
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            return kills
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += proc.returncode == -signal.SIGKILL
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == rc, done.stderr
    return kills


def batch_main_one_thread(argv: list[str]) -> int:
    """`batch_main(argv)` on one torch thread, as the killed runs (OMP_NUM_THREADS=1): the scores' last bits follow
    the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return batch_main(argv)
    finally:
        torch.set_num_threads(threads)


def assert_same_output(out: Path, reference: Path) -> None:
    """A resumed job's folder equals an uninterrupted run's: the same rows (order, scores), errors, files, shard bytes
    and manifest shards, and no temporary or journal file left."""
    assert read_rows(out) == read_rows(reference)  # same rows, same order, same scores: no loss, no duplicates
    assert read_errors(out) == read_errors(reference)
    ref_files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ref_files
    for name in ref_files:
        if name.startswith("part-"):
            assert (out / name).read_bytes() == (reference / name).read_bytes()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["shards"] == json.loads((reference / "_manifest.json").read_text())["shards"]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.journal"))
