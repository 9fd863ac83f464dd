"""Every GPU row of issue 18 (and the BLIP-2 GPU rows of issue 17) in one command: one table, one JSON file.

    PYTHONPATH=src python benchmarks/gpu.py [--device cuda] [--out runs/bench/gpu.json] [--budget-s 480]
    python benchmarks/gpu.py --smoke          # tiny models on the CPU, a few steps (the test suite runs this)
    make bench-gpu

Needs PyTorch and the project only. Rows whose package is missing are reported as skipped with the package's name
(transformers for the rows against it and the rows whose scripts build their checkpoints with it; fastapi, uvicorn
and httpx for the serving row), so those can be carried over as wheels. Measured here, in this process:

- dense 8192^3 bf16 matmul: the device's reference rate;
- vision encoder (ViT-B/16 at 384), batch 128, bf16: TFLOP/s and its share of that rate (target >= 60%), and whether
  SDPA's flash kernel takes the attention (run once with SDPA restricted to it);
- caption greedy, batch 128, fp16, 20 new tokens, pixels ready: ours (decode="static": CUDA graphs; and "eager")
  against transformers' `generate` (target >= 4x), token ids compared;
- batch-1 caption of 20 tokens from a decoded image (preprocessing, copy, ViT, decoding; target <= 25 ms).

Then, as subprocesses with their own JSON (under the output's folder): `benchmarks/batch_throughput.py` (`blip batch
caption` over 2048 generated 640x480 JPEGs, batch 128), `benchmarks/serve_load.py` (base captioner, 1 and 64
clients), `benchmarks/bench_train.py` (base pretrain at 224 px and caption fine-tune at 384 px, batch 32, bf16) and
`benchmarks/blip2_vs_transformers.py --only gpu`. Each gets what is left of `--budget-s` (8 minutes in all by default);
a row that does not fit is reported as skipped for time. `--smoke` checks their command lines against the scripts'
own flags instead of running them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import vs_transformers  # noqa: E402
from vs_transformers import vit_flops  # noqa: E402

from blip.config import PRESETS, BlipConfig, TextConfig, VisionConfig  # noqa: E402
from blip.models.blip import BlipModel  # noqa: E402
from blip.models.generation import generate  # noqa: E402
from blip.models.init import init_weights  # noqa: E402
from blip.models.static_decode import text_decoder_stepper  # noqa: E402
from blip.models.vit import VisionTransformer  # noqa: E402
from blip.tasks.options import CaptionOptions  # noqa: E402
from blip.transforms import ImageTransform  # noqa: E402

NEW_TOKENS = 20
SERVE_PACKAGES = ("fastapi", "uvicorn", "httpx")
MIN_ROW_SECONDS = 30  # a script row is not started with less of the budget left


@dataclasses.dataclass
class Sizes:
    """What a run measures at: the real sizes, or `--smoke`'s tiny ones."""

    matmul: int = 8192
    vision_batch: int = 128
    caption_batch: int = 128
    repeats: int = 3
    e2e_repeats: int = 10

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(matmul=128, vision_batch=2, caption_batch=3, repeats=1, e2e_repeats=1)


def missing(*packages: str) -> list[str]:
    return [p for p in packages if importlib.util.find_spec(p) is None]


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call, synchronised on CUDA."""
    fn()
    return vs_transformers.timed(fn, repeats, device)


# --- models -----------------------------------------------------------------------------------------------------------


def tiny_config() -> BlipConfig:
    vision = VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8)  # fmt: skip
    text = TextConfig(vocab_size=120, hidden_size=32, encoder_hidden_size=32, intermediate_size=40,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, bos_token_id=118,
                      sep_token_id=3)  # fmt: skip
    return BlipConfig(vision, text, "caption")


def caption_models(args: argparse.Namespace, dtype: torch.dtype) -> tuple[BlipModel, ImageTransform, Any, str]:
    """(our model, its preprocessing, transformers' model or None, why None) with the same random weights: a
    transformers-made checkpoint at BLIP-base size (tiny with --smoke) when transformers is there, else ours alone."""
    device = torch.device(args.device)
    if args.no_transformers or missing("transformers"):
        config = tiny_config() if args.smoke else PRESETS["blip_base_caption"]
        torch.manual_seed(0)
        model = BlipModel(config)
        init_weights(model)
        model = model.to(device, dtype).eval()
        reason = "transformers not installed" if not args.no_transformers else "--no-transformers"
        return model, ImageTransform(image_size=config.vision.image_size), None, reason
    import transformers

    import blip
    from oracle import TinySpec, base_spec, build_hf_checkpoint

    spec = TinySpec(kind="caption", seed=1) if args.smoke else base_spec("caption")
    folder = Path(args.cache) / ("blip_tiny_caption_random" if args.smoke else "blip_base_caption_random")
    if not (folder / "model.safetensors").exists():
        print(f"building a random-weight captioning checkpoint in {folder} ...", flush=True)
        build_hf_checkpoint(folder, spec)
    ours = blip.load(folder, device=device, dtype=dtype)
    hf = transformers.BlipForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    return ours.model, ours.transform, hf, ""


@torch.inference_mode()
def captions_from_pixels(model: BlipModel, pixels: torch.Tensor, mode: str) -> list[list[int]]:
    decoder, text = model.text_decoder, model.config.text
    cross = decoder.bert.cross_kv(model.encode_image(pixels))
    gen = CaptionOptions(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, decode=mode).generation()
    stepper = text_decoder_stepper(decoder, cross, [text.bos_token_id], mode)
    return [s[0].token_ids for s in generate(stepper, gen, eos_id=text.sep_token_id)]


@torch.inference_mode()
def hf_captions_from_pixels(hf: Any, pixels: torch.Tensor) -> list[list[int]]:
    out = hf.generate(pixel_values=pixels, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return [seq[seq != 0].tolist() for seq in out]


# --- rows measured here -----------------------------------------------------------------------------------------------


def matmul_row(args: argparse.Namespace, sizes: Sizes) -> dict:
    dev = torch.device(args.device)
    n = sizes.matmul
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    seconds = timed(lambda: a @ a, sizes.repeats, dev)
    return dict(label=f"dense {n}^3 bf16 matmul", tflops=2 * n**3 / seconds / 1e12, seconds=seconds)


def vision_row(args: argparse.Namespace, sizes: Sizes, peak_tflops: float) -> dict:
    dev = torch.device(args.device)
    config = tiny_config() if args.smoke else PRESETS["blip_base_caption"]
    torch.manual_seed(0)
    vision = VisionTransformer(config.vision).to(dev, torch.bfloat16).eval()  # default init: speed only
    size = config.vision.image_size
    pixels = torch.randn(sizes.vision_batch, 3, size, size, device=dev, dtype=torch.bfloat16)
    with torch.inference_mode():
        seconds = timed(lambda: vision(pixels), sizes.repeats, dev)
    tflops = vit_flops(config.vision) * sizes.vision_batch / seconds / 1e12
    row = dict(
        label=f"vision encoder, batch {sizes.vision_batch}, bf16",
        seconds=seconds,
        tflops=tflops,
        share_of_matmul=tflops / peak_tflops,
        target="share_of_matmul >= 0.60",
        met=tflops / peak_tflops >= 0.60,
    )
    if dev.type == "cuda":  # the attention on flash, or an error saying why not
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with torch.inference_mode(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                vision(pixels[:2])
            row["flash_attention"] = True
        except RuntimeError as e:
            row["flash_attention"] = False
            row["flash_error"] = str(e).splitlines()[0]
    return row


def caption_rows(args: argparse.Namespace, sizes: Sizes) -> dict[str, dict]:
    from oracle import make_images

    dev = torch.device(args.device)
    model, transform, hf, why = caption_models(args, torch.float16 if dev.type == "cuda" else torch.float32)
    dtype = next(model.parameters()).dtype
    rows: dict[str, dict] = {}

    # batch 128, pixels ready
    batch = sizes.caption_batch
    pixels = transform(make_images(batch, seed=7)).to(dev, dtype)
    static = captions_from_pixels(model, pixels, "static")
    eager = captions_from_pixels(model, pixels, "eager")
    row = dict(
        label=f"caption greedy, batch {batch}, {str(dtype).removeprefix('torch.')}, {NEW_TOKENS} tokens",
        static_s=timed(lambda: captions_from_pixels(model, pixels, "static"), sizes.repeats, dev),
        eager_s=timed(lambda: captions_from_pixels(model, pixels, "eager"), sizes.repeats, dev),
        static_equals_eager=sum(a == b for a, b in zip(static, eager)),
        of=batch,
        target="transformers_s / static_s >= 4",
    )
    if hf is None:
        row["transformers"] = f"skipped: {why}"
    else:
        theirs = hf_captions_from_pixels(hf, pixels)
        row["transformers_s"] = timed(lambda: hf_captions_from_pixels(hf, pixels), sizes.repeats, dev)
        row["ratio"] = row["transformers_s"] / row["static_s"]
        row["met"] = row["ratio"] >= 4
        row["same_tokens_as_transformers"] = sum(m == t[: len(m)] for m, t in zip(static, theirs))
    rows[f"caption_greedy_b{batch}"] = row

    # batch 1, end to end from a decoded image
    image = make_images(1, seed=9)[0]

    def one(mode: str) -> list[list[int]]:
        return captions_from_pixels(model, transform([image]).to(dev, dtype, non_blocking=True), mode)

    ms = {mode: 1e3 * timed(lambda mode=mode: one(mode), sizes.e2e_repeats, dev) for mode in ("static", "eager")}
    rows["caption_b1_e2e"] = dict(
        label=f"caption batch 1, {NEW_TOKENS} tokens, from a decoded image",
        static_ms=ms["static"],
        eager_ms=ms["eager"],
        target="static_ms <= 25",
        met=ms["static"] <= 25,
    )
    return rows


# --- rows run by the other benchmark scripts --------------------------------------------------------------------------


@dataclasses.dataclass
class ScriptRow:
    key: str
    label: str
    script: str
    argv: list[str]
    out: str  # the JSON the script writes (relative to the output's folder)
    needs: tuple[str, ...]
    summary: Callable[[Any], dict]


def _batch_summary(data: Any) -> dict:
    return {
        f"{dtype} {who} img/s": round(r["images_per_s"], 1)
        for dtype, group in data["results"].items()
        for who, r in group.items()
    }


def _serve_summary(data: Any) -> dict:
    return {
        f"{r['clients']} clients, batching {r['batching']}": f"{r['req_per_s']:.1f} req/s, p50 {r['p50_ms']:.0f} ms"
        for r in data
    }


def _train_summary(data: Any) -> dict:
    return {f"{r['task']} {r['image_size']}px samples/s": r["samples_per_s"] for r in data}


def _blip2_summary(data: Any) -> dict:
    gpu = data["results"]["gpu"]
    return {name: f"ratio {row['ratio']:.2f}x (agree {row['outputs_agree']})" for name, row in gpu.items()
            if isinstance(row, dict)}  # fmt: skip


def script_rows(args: argparse.Namespace) -> list[ScriptRow]:
    dev, cache = args.device, args.cache
    base_train = ["--width", "0", "--layers", "0", "--text-layers", "0", "--patch-size", "16", "--batch", "32",
                  "--device", dev, "--amp", "bf16", "--steps", "10", "--warmup", "3"]  # fmt: skip
    return [
        ScriptRow(
            "batch_caption_2048",
            "blip batch caption, 2048 JPEGs 640x480, batch 128",
            "batch_throughput.py",
            [
                "--images",
                "2048",
                "--batch-size",
                "128",
                "--device",
                dev,
                "--bf16",
                "--skip-pipeline",
                "--workers",
                str(min(12, os.cpu_count() or 1)),
                "--threads",
                "4",
                "--cache",
                cache,
            ],
            "batch_throughput.json",
            ("transformers",),
            _batch_summary,
        ),  # fmt: skip
        ScriptRow(
            "serve_load",
            "blip serve, base caption, closed-loop clients",
            "serve_load.py",
            ["--models", "base", "--clients", "1", "64"],
            "serve_load.json",
            ("transformers", *SERVE_PACKAGES),
            _serve_summary,
        ),  # fmt: skip
        ScriptRow(
            "train_pretrain_224",
            "training: base pretrain, 224 px, batch 32, bf16",
            "bench_train.py",
            ["--preset", "blip_base_pretrain", "--tasks", "pretrain", "--image-size", "224", *base_train],
            "train_pretrain.json",
            (),
            _train_summary,
        ),  # fmt: skip
        ScriptRow(
            "train_caption_384",
            "training: caption fine-tune, 384 px, batch 32, bf16",
            "bench_train.py",
            ["--preset", "blip_base_caption", "--tasks", "caption", "--image-size", "384", *base_train],
            "train_caption.json",
            (),
            _train_summary,
        ),  # fmt: skip
        ScriptRow(
            "blip2_gpu",
            "BLIP-2 OPT-2.7b shapes (issue 17), fp16 GPU rows",
            "blip2_vs_transformers.py",
            ["--only", "gpu", "--gpu-device", dev, "--cache", cache, *args.blip2_args.split()],
            "blip2_gpu.json",
            ("transformers",),
            _blip2_summary,
        ),  # fmt: skip
    ]


def script_flags(script: Path) -> set[str]:
    """The option strings a benchmark script's argparse parser defines (read from its source, not run)."""
    flags = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return flags


def run_script(row: ScriptRow, args: argparse.Namespace, out_dir: Path, seconds_left: float) -> dict:
    script = ROOT / "benchmarks" / row.script
    result: dict[str, Any] = dict(label=row.label)
    unknown = [a for a in row.argv if a.startswith("--") and a not in script_flags(script)]
    if unknown:
        return dict(result, status="failed", reason=f"{row.script} has no flag {', '.join(unknown)}")
    absent = missing(*row.needs)
    if absent:
        return dict(result, status="skipped", reason=f"needs {', '.join(absent)} (not installed)")
    command = [sys.executable, str(script), *row.argv, "--out", str(out_dir / row.out)]
    result["command"] = " ".join(command)
    if args.smoke:
        return dict(result, status="skipped", reason="--smoke: command line checked, not run")
    if seconds_left < MIN_ROW_SECONDS:
        return dict(result, status="skipped", reason=f"time budget ({args.budget_s:.0f}s) spent")
    paths = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    print(f"\n--- {row.label}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    # a session of its own, so that a timeout also ends what the script started (serve_load's server)
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=seconds_left)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return dict(result, status="failed", reason=f"timed out after {seconds_left:.0f}s (the time budget)")
    result["seconds"] = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
        return dict(result, status="failed", reason=f"exit {proc.returncode}: {tail}")
    try:
        result.update(row.summary(json.loads((out_dir / row.out).read_text())))
    except (OSError, ValueError, KeyError, TypeError) as e:
        result["summary"] = f"see {out_dir / row.out} ({type(e).__name__} reading it)"
    return dict(result, status="ok")


# --- main -------------------------------------------------------------------------------------------------------------


def describe(row: dict) -> str:
    skip = {"label", "status", "reason", "command", "target", "met"}
    parts = []
    for key, value in row.items():
        if key in skip:
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="where to measure (--smoke: cpu)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "gpu.json"))
    parser.add_argument("--cache", default=str(ROOT / "runs" / "bench"), help="checkpoints built once, kept here")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting rows after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU; other scripts not run")
    parser.add_argument("--no-transformers", action="store_true", help="measure as if transformers were absent")
    parser.add_argument("--blip2-args", default="--layers 4", help="extra flags for blip2_vs_transformers.py")
    parser.add_argument("--skip", nargs="*", default=[], help="row keys to leave out")
    args = parser.parse_args(argv)
    if args.smoke and "--device" not in (argv if argv is not None else sys.argv):
        args.device = "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or use --smoke (CPU)")
    sizes = Sizes.smoke() if args.smoke else Sizes()
    start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    machine = dict(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        smoke=args.smoke,
        transformers=None if missing("transformers") else __import__("transformers").__version__,
    )
    print(f"{machine['device']}, torch {machine['torch']}, CUDA {machine['cuda']}", flush=True)
    rows: dict[str, dict] = {}

    def measure(key: str, fn: Callable[[], dict | dict[str, dict]], many: bool = False) -> None:
        if key in args.skip:
            rows[key] = dict(label=key, status="skipped", reason="--skip")
            return
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001 - one failing row is reported, the others still run
            rows[key] = dict(label=key, status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0])
            return
        for k, row in got.items() if many else [(key, got)]:
            rows[k] = dict(row, status="ok")
            print(f"{row['label']}: {describe(row)}", flush=True)

    measure("matmul_bf16", lambda: matmul_row(args, sizes))
    peak = rows["matmul_bf16"].get("tflops") or float("nan")
    measure("vision_b128_bf16", lambda: vision_row(args, sizes, peak))
    measure("caption", lambda: caption_rows(args, sizes), many=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    for row in script_rows(args):
        if row.key in args.skip:
            rows[row.key] = dict(label=row.label, status="skipped", reason="--skip")
            continue
        rows[row.key] = run_script(row, args, out.parent, args.budget_s - (time.perf_counter() - start))

    total = time.perf_counter() - start
    print("\n| row | status | measured | target | met |\n|---|---|---|---|---|")
    for row in rows.values():
        measured = describe(row) if row["status"] == "ok" else row.get("reason", "")
        met = {True: "yes", False: "NO"}.get(row.get("met"), "")
        print(f"| {row['label']} | {row['status']} | {measured} | {row.get('target', '')} | {met} |")
    print(f"\n{total:.0f}s in all; wrote {out}")
    record = dict(machine=machine, seconds=total, rows=rows)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


if __name__ == "__main__":
    main()
