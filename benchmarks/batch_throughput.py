"""Images/s of `blip batch caption` against plain transformers loops, on the same images and the same checkpoint.

    .venv/bin/python benchmarks/batch_throughput.py [--images 16] [--batch-size 8] [--threads 2] [--device cpu]
                                                    [--bf16] [--out runs/bench/batch_throughput.json]

The checkpoint is a transformers-made random-weight BlipForConditionalGeneration at BLIP-base size (ViT-B/16 at 384,
12-layer BERT, 12 heads, 30524-token vocabulary; tests/oracle.py), built once and cached under runs/bench/. The images
are JPEG files of photo-like size (640x480). Every contender reads the files from disk, decodes, preprocesses and
generates greedy captions of 20 new tokens; the time to load the model is measured apart and not counted:

- ours: `blip batch caption --batch-size B` (run_batch in process: prefetching decoder threads, the task code,
  journal and shard writes included);
- transformers pipeline: `pipeline("image-to-text")` called once per image path (the plain loop; transformers 5
  names that task "image-text-to-text");
- transformers generate: a loop that opens a batch of B images, runs BlipProcessor and
  `BlipForConditionalGeneration.generate` per batch.

Prints images/s and ratios (ours / theirs) and checks that the captions agree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from blip.io import read_jsonl  # noqa: E402
from blip.jobs import BatchConfig, TaskOptions, run_batch  # noqa: E402
from oracle import base_spec, build_hf_checkpoint  # noqa: E402

MAX_NEW_TOKENS = 20
# every contender generates exactly this many tokens: in bf16 the captions differ, and an early [SEP] on one side
# would time less work there
FORCED_LENGTH = {"max_new_tokens": MAX_NEW_TOKENS, "min_new_tokens": MAX_NEW_TOKENS}


def checkpoint(cache: Path) -> Path:
    folder = cache / "blip_base_caption_random"
    if not (folder / "model.safetensors").exists():
        print(f"building a random-weight BLIP-base captioning checkpoint in {folder} ...", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        build_hf_checkpoint(folder, base_spec("caption"))
    return folder


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Photo-like 640x480 JPEGs: smooth colour fields, shapes of light and some noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    paths = []
    for i in range(n):
        base = rng.uniform(0, 255, size=3)
        slope = rng.uniform(-0.3, 0.3, size=(2, 3))
        img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
        for _ in range(4):
            cx, cy, r = rng.uniform(0, 640), rng.uniform(0, 480), rng.uniform(30, 150)
            mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < r**2
            img[mask] = rng.uniform(0, 255, size=3)
        img += rng.normal(0, 8, size=img.shape)
        path = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def run_ours(model_dir: Path, photos: Path, args, dtype: str | None) -> tuple[float, float, list[str]]:
    import blip

    model, load_s = timed(lambda: blip.load(model_dir, device=args.device, dtype=dtype))
    model.caption(Image.open(next(photos.iterdir())), max_new_tokens=2)  # warm-up, as for the others
    out = Path(tempfile.mkdtemp(prefix="blip_batch_bench_"))
    try:
        cfg = BatchConfig(
            task="caption",
            model=str(model_dir),
            input=str(photos),
            out=str(out),
            device=args.device,
            dtype=dtype,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=False,
            options=TaskOptions(max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS),
        )
        result, total_s = timed(lambda: run_batch(cfg))
        assert result.summary.rows_ok == args.images, result.summary
        captions = [r["caption"] for p in sorted(out.glob("part-*.jsonl")) for r in read_jsonl(p)]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return total_s - load_s, total_s, captions


def run_pipeline(model_dir: Path, paths: list[Path], args, dtype: torch.dtype) -> tuple[float, list[str]]:
    """transformers 5 replaced the "image-to-text" task by "image-text-to-text" (BLIP needs text="" there)."""
    import transformers.pipelines
    from transformers import pipeline

    if "image-to-text" in transformers.pipelines.SUPPORTED_TASKS:
        pipe = pipeline("image-to-text", model=str(model_dir), device=args.device, dtype=dtype)

        def caption(path: Path) -> str:
            return pipe(str(path), generate_kwargs=FORCED_LENGTH)[0]["generated_text"]
    else:
        pipe = pipeline("image-text-to-text", model=str(model_dir), device=args.device, dtype=dtype)

        def caption(path: Path) -> str:
            out = pipe(images=str(path), text="", generate_kwargs=FORCED_LENGTH)
            return out[0]["generated_text"]

    caption(paths[0])  # warm-up, not counted
    captions, seconds = timed(lambda: [caption(p) for p in paths])
    return seconds, captions


def run_generate(model_dir: Path, paths: list[Path], args, dtype: torch.dtype) -> tuple[float, list[str]]:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval().to(args.device)
    processor = BlipProcessor.from_pretrained(model_dir)

    def loop() -> list[str]:
        captions = []
        for start in range(0, len(paths), args.batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[start : start + args.batch_size]]
            inputs = processor(images=images, return_tensors="pt").to(args.device, dtype)
            with torch.inference_mode():
                ids = model.generate(**inputs, **FORCED_LENGTH)
            captions += processor.batch_decode(ids, skip_special_tokens=True)
        return captions

    with torch.inference_mode():  # warm-up, not counted
        model.generate(
            **processor(images=[Image.open(paths[0])], return_tensors="pt").to(args.device, dtype), max_new_tokens=2
        )
    captions, seconds = timed(loop)
    return seconds, captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, help="decode processes of blip batch (default: its own; 0: threads)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also time `blip batch --dtype bfloat16`")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "batch_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    model_dir = checkpoint(Path(args.cache))
    dtypes = {"float32": torch.float32, **({"bfloat16": torch.bfloat16} if args.bf16 else {})}
    results: dict[str, dict[str, dict[str, float]]] = {}
    work = Path(tempfile.mkdtemp(prefix="blip_batch_photos_"))
    try:
        paths = make_photos(work / "photos", args.images)
        for name, dtype in dtypes.items():
            group = results[name] = {}
            ours_s, ours_total_s, ours_caps = run_ours(model_dir, work / "photos", args, name)
            group["blip batch caption"] = {"seconds": ours_s, "with_load_seconds": ours_total_s}
            gen_s, gen_caps = run_generate(model_dir, paths, args, dtype)
            agree = sum(a == b for a, b in zip(ours_caps, gen_caps))
            group["transformers generate/batch"] = {"seconds": gen_s, "captions_agree": agree}
            if not args.skip_pipeline:
                pipe_s, pipe_caps = run_pipeline(model_dir, paths, args, dtype)
                agree = sum(a == b for a, b in zip(ours_caps, pipe_caps))
                group["transformers pipeline loop"] = {"seconds": pipe_s, "captions_agree": agree}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.images
    print(
        f"\nblip batch caption vs transformers: {n} JPEGs 640x480, BLIP-base (random weights), greedy, "
        f"{MAX_NEW_TOKENS} new tokens, batch {args.batch_size}, {args.threads} torch threads, device {args.device}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    for name, group in results.items():
        ours_rate = n / group["blip batch caption"]["seconds"]
        print(f" {name}:")
        for contender, r in group.items():
            r["images_per_s"] = n / r["seconds"]
            ratio = ours_rate / r["images_per_s"]
            agree = f", captions agree {r['captions_agree']}/{n}" if "captions_agree" in r else ""
            print(
                f"  {contender:28s} {r['images_per_s']:7.3f} img/s  ({r['seconds']:.1f}s)  "
                f"blip batch = {ratio:.2f}x this{agree}"
            )
    record = {
        "images": n,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": args.device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
