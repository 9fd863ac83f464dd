"""ONNX Runtime (CPU) vs our PyTorch path vs transformers, captioning at BLIP-base size, measured in one run.

    .venv/bin/python benchmarks/onnx_vs_torch.py [--repeats 3] [--threads 2] [--fp16] [--out runs/bench/onnx.json]

Builds a random-weight base-size captioning checkpoint with transformers (ViT-B/16 at 384, 12-layer BERT, 30524-token
vocabulary, as benchmarks/vs_transformers.py does), exports it with `blip.export.export` (fp32; `--fp16` adds an
fp16 export), and times greedy captions of 20 new tokens (min_new_tokens=20, so every row decodes the same length)
at batch 1 and 8, preprocessing included everywhere: `OnnxBlip.caption` (numpy + onnxruntime), `Blip.caption` and
transformers' `generate`. Reports seconds (median of `--repeats`) and whether the token ids agree; no targets.
OMP_WAIT_POLICY defaults to PASSIVE here (PyTorch's OpenMP threads; ONNX Runtime has its own pool).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# OpenMP threads sleep while they wait (what `blip caption` sets for one-shot commands): on a machine whose cores are
# busy, spinning threads made our batch-1 caption 25 s instead of 2.9 s in one run. The user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vs_transformers import timed as median_seconds  # noqa: E402

import blip  # noqa: E402
from blip.export import export  # noqa: E402
from blip.export.onnx_runtime import OnnxBlip  # noqa: E402
from oracle import base_spec, build_hf_checkpoint, make_images  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    return median_seconds(fn, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp16", action="store_true", help="also time an fp16 export on ONNX Runtime's CPU provider")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="caption batch sizes (default: 1 8)")
    parser.add_argument("--out", default="runs/bench/onnx_vs_torch.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime
    import transformers

    work = Path(tempfile.mkdtemp(prefix="blip-onnx-bench-"))
    caption_dir = build_hf_checkpoint(work / "caption", base_spec("caption"))
    ours = blip.load(caption_dir)
    hf = transformers.BlipForConditionalGeneration.from_pretrained(caption_dir).eval()
    processor = transformers.BlipProcessor.from_pretrained(caption_dir)
    runners = {}
    exports = {}
    for dtype in ["float32", "float16"] if args.fp16 else ["float32"]:
        started = time.perf_counter()
        export(ours, work / f"onnx_{dtype}", dtype=dtype)
        exports[dtype] = time.perf_counter() - started
        runners[dtype] = OnnxBlip(work / f"onnx_{dtype}", threads=args.threads)
    print(
        f"torch {torch.__version__} ({args.threads} threads), onnxruntime {onnxruntime.__version__}, transformers "
        f"{transformers.__version__}; export took " + ", ".join(f"{d} {s:.1f}s" for d, s in exports.items()),
        flush=True,
    )
    images8 = make_images(max(args.batches), seed=1)
    gen = dict(max_new_tokens=20, min_new_tokens=20)

    def hf_caption(images):
        with torch.inference_mode():
            return hf.generate(**processor(images=images, return_tensors="pt"), num_beams=1, **gen)

    results = {}
    for batch in args.batches:
        images = images8[:batch]
        reference = [c.token_ids for c in ours.caption(images, **gen)]
        theirs = [seq[seq != 0].tolist() for seq in hf_caption(images)]
        row = {
            "ours_torch_s": timed(lambda images=images: ours.caption(images, **gen), args.repeats),
            "transformers_s": timed(lambda images=images: hf_caption(images), args.repeats),
            "transformers_agree": [t[: len(r)] for t, r in zip(theirs, reference)] == reference,
        }
        for dtype, runner in runners.items():
            got = [c.token_ids for c in runner.caption(images, **gen)]
            run = lambda images=images, r=runner: r.caption(images, **gen)  # noqa: E731
            row[f"onnxruntime_{dtype}_s"] = timed(run, args.repeats)
            row[f"onnxruntime_{dtype}_agree"] = got == reference
        results[f"caption_greedy_b{batch}"] = row
        onnx_times = "  ".join(
            f"onnxruntime {d} {row[f'onnxruntime_{d}_s']:6.2f}s (ids agree: {row[f'onnxruntime_{d}_agree']})"
            for d in runners
        )
        print(
            f"caption, greedy, batch {batch}, 20 new tokens:  {onnx_times}  ours (torch) {row['ours_torch_s']:6.2f}s  "
            f"transformers {row['transformers_s']:6.2f}s (ids agree: {row['transformers_agree']})",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    out.write_text(json.dumps({"meta": meta, "export_s": exports, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
