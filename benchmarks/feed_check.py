"""Batch-job feeding check: `blip batch caption` with image decoding in worker processes against threads in the
job's process, on the same JPEGs: the rows must be identical, and the images/s show what feeding the device costs.

    python benchmarks/feed_check.py --device cuda --workers 0 8 --images 1024 --batch-size 128   # a GPU machine
    python benchmarks/feed_check.py --device cpu --workers 0 2 --images 192 --batch-size 16         # here

Needs nothing but PyTorch, Pillow and the project (`PYTHONPATH=src`): the model is a random-weight captioner of the
`--preset` (BLIP-base by default; `blip_test` for a tiny one) with the shapes vocabulary, saved once under `--cache`;
the images are 640x480 JPEGs. Captions of exactly `--tokens` tokens (greedy). The first run of each setting also
loads the model and starts its workers: `--rounds 2` (default) reports both; the second is the steady one.
Prints one JSON line per run and a summary; writes `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip.io import read_jsonl
from blip.jobs import BatchConfig, TaskOptions, run_batch


def make_model(folder: Path, preset: str) -> Path:
    """A random-weight captioner of `preset` saved as a Hugging Face folder (once)."""
    if (folder / "config.json").exists():
        return folder
    from blip.api import Blip
    from blip.train.config import TrainConfig
    from blip.train.modeling import build_model

    torch.manual_seed(0)
    model, tokenizer = build_model(TrainConfig(task="caption", preset=preset, vocab="shapes"))
    Blip.from_model(model, tokenizer).save(folder)
    return folder


def make_images(folder: Path, n: int) -> Path:
    if folder.exists() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)  # smooth, photo-like after the upscale
        Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def run(model: Path, photos: Path, args: argparse.Namespace, workers: int) -> tuple[dict, list[dict]]:
    out = Path(tempfile.mkdtemp(prefix="blip_feed_"))
    try:
        cfg = BatchConfig(
            task="caption",
            model=str(model),
            input=str(photos),
            out=str(out),
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            workers=workers,
            prefetch=args.prefetch,
            progress=False,
            options=TaskOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens),
        )
        started = time.perf_counter()
        result = run_batch(cfg)
        seconds = time.perf_counter() - started
        rows = [row for path in sorted(out.glob("part-*.jsonl")) for row in read_jsonl(path)]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert result.summary.rows_ok == args.images, result.summary
    return {"workers": workers, "seconds": round(seconds, 2), "images_per_s": round(args.images / seconds, 1)}, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 (default: float32)")
    parser.add_argument("--preset", default="blip_base_caption")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 8])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", default="runs/bench/feed")
    parser.add_argument("--out", default="runs/bench/feed_check.json")
    args = parser.parse_args()
    cache = Path(args.cache)
    model = make_model(cache / f"model_{args.preset}", args.preset)
    photos = make_images(cache / f"photos_{args.images}", args.images)
    runs, reference = [], None
    for round_ in range(args.rounds):
        for workers in args.workers:
            timing, rows = run(model, photos, args, workers)
            timing.update(round=round_, same_rows=reference is None or rows == reference)
            reference = reference if reference is not None else rows
            runs.append(timing)
            print(json.dumps(timing), flush=True)
    summary = {
        "device": args.device,
        "dtype": args.dtype or "float32",
        "preset": args.preset,
        "images": args.images,
        "batch_size": args.batch_size,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "rows_identical": all(r["same_rows"] for r in runs),
        "runs": runs,
    }
    print(json.dumps(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
