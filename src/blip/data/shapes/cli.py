"""Command line: `blip data shapes ...` (also `python -m blip.data.shapes`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from blip.data.shapes.dataset import generate
from blip.data.shapes.scene import NOISE_KINDS, ShapesConfig


def _rates(text: str) -> tuple[float, float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != len(NOISE_KINDS):
        raise argparse.ArgumentTypeError(f"expected {len(NOISE_KINDS)} comma-separated rates {NOISE_KINDS}")
    return tuple(parts)  # type: ignore[return-value]


def cli_main(argv: list[str] | None = None, prog: str = "blip data shapes") -> int:
    """Generate a shapes dataset from the command line. Returns the exit code (0 ok, 2 refused folder)."""
    p = argparse.ArgumentParser(prog=prog, description="Generate the synthetic shapes image-text dataset.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-web", type=int, default=20000, help="noisy web images (one caption each)")
    p.add_argument("--n-clean", type=int, default=2000, help="clean images (5 reference captions each)")
    p.add_argument("--n-vqa", type=int, default=2000, help="VQA images (several questions each)")
    p.add_argument("--n-test", type=int, default=500, help="test images (5 references and questions each)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-shapes", type=int, default=3)
    p.add_argument(
        "--noise-rates", type=_rates, default=ShapesConfig.noise_rates, help="correct,partial,unrelated,junk"
    )
    p.add_argument("--no-texture", action="store_true", help="no texture noise")
    p.add_argument("--webdataset", action="store_true", help="also write WebDataset shards of the web split")
    p.add_argument("--shard-size", type=int, default=1000, help="rows per WebDataset shard")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset made with other arguments")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        cfg = ShapesConfig(
            image_size=a.image_size, max_shapes=a.max_shapes, noise_rates=a.noise_rates, texture=not a.no_texture
        )
    except ValueError as e:
        p.error(str(e))
    t0 = time.perf_counter()
    try:
        meta = generate(
            a.out,
            seed=a.seed,
            n_clean=a.n_clean,
            n_web=a.n_web,
            n_vqa=a.n_vqa,
            n_test=a.n_test,
            cfg=cfg,
            webdataset=a.webdataset,
            shard_size=a.shard_size,
            workers=a.workers,
            progress=not a.quiet,
            overwrite=a.overwrite,
        )
    except (FileExistsError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    c = meta["counts"]
    print(
        f"wrote {sum(c['images'].values())} images to {a.out} in {time.perf_counter() - t0:.1f}s: "
        f"{json.dumps(c['images'])}; web noise {json.dumps(c['web_noise'])}; "
        f"{c['vqa_questions']} + {c['vqa_test_questions']} questions; vocabulary {meta['vocab_size']} words"
    )
    return 0
