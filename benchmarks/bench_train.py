"""Training throughput per task: optimizer steps/s, samples/s, model FLOP utilisation and peak memory on synthetic
batches.

    python benchmarks/bench_train.py                                   # the shapes model on CPU
    python benchmarks/bench_train.py --compare-matmul                  # oneDNN vs F.linear training linears (CPU)
    python benchmarks/bench_train.py --preset blip_base_pretrain --image-size 224 --batch 32 --device cuda --amp bf16 \
        --width 0 --layers 0 --text-layers 0 --tasks pretrain [--compile]

Model FLOP utilisation (MFU) = model FLOPs per sample x samples/s / the device's dense matrix-product rate, measured
here in the step's dtype (an 8192^3 product on a GPU, 2048^3 on a CPU; `--peak-tflops` gives a nominal peak
instead). Model FLOPs count the matrix products of the config (2 FLOPs per multiply-add; norms, softmax and the
optimizer not counted), per sample, a forward pass x3 for the passes that train (forward + backward) and x1 for the
momentum encoders' forwards (`model_flops`):

    ViT        Lv * (Tv * (8 dv^2 + 4 dv mv) + 4 Tv^2 dv) + 2 * 3 P^2 * dv * (Tv - 1)     Tv = (S/P)^2 + 1
    text(T)    Lt * (T * (8 dt^2 + 4 dt mt) + 4 T^2 dt)                                      unimodal, T tokens
    cross(T)   Lt * (4 T dt^2 + 4 Tv dv dt + 4 T Tv dt)                                      + cross-attention
    head(T)    T * (2 dt^2 + 2 dt V)                                                         LM head

    caption    3 (ViT + text + cross + head)
    pretrain   3 ViT + 1 ViT_m + 3 text + 1 text_m + 3 x 3 (text + cross) [ITM: 1 positive + 2 negatives]
               + 3 (text + cross + head) [LM]
    retrieval  pretrain without the LM term
    vqa        3 (ViT + text + cross) + 3 x 3 (text_a + cross_a + head_a) [3 answers of `--answer-length`]

Synthetic batches (random pixels, random caption tokens, 3 answers per question) go through the real training tasks
(`blip.train.objectives`) with AdamW; data loading is not measured. `--compare-matmul` alternates blocks of steps
between our CPU linears (oneDNN, `blip.models.kernels`) and plain `F.linear` in the same process, so that both see the
same machine load (this machine is often shared), and reports the median step time of each. Results are printed and
written as JSON (`--out`, default runs/bench/train.json) for comparison across commits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from blip.train.config import TrainConfig
from blip.train.loop import compiled
from blip.train.modeling import build_model
from blip.train.optim import adamw_kernel, build_optimizer
from blip.train.recipe import build_task


def synthetic_batch(task: str, batch: int, image_size: int, vocab: int, length: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab - 2, (batch, length), generator=generator)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP] in the shapes vocabulary; any ids work for timing
    out = {
        "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=generator),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "image_ids": torch.arange(batch),
    }
    if task == "vqa":
        answers = torch.randint(5, vocab - 2, (3 * batch, 3), generator=generator)
        out.update(
            answer_ids=answers,
            answer_mask=torch.ones_like(answers),
            answer_weights=torch.full((3 * batch,), 1 / 3),
            answer_owner=torch.arange(batch).repeat_interleave(3),
        )
    return {k: v.to(device) for k, v in out.items()}


def bench(task: str, args: argparse.Namespace) -> dict:
    cfg = TrainConfig(
        task=task,
        preset=args.preset,
        vocab=args.vocab,
        image_size=args.image_size,
        patch_size=args.patch_size,
        vision_width=args.width,
        vision_layers=args.layers,
        text_width=args.width,
        text_layers=args.text_layers,
        queue_size=4096,
    )
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg)
    task_module = build_task(cfg, model, tokenizer, steps_per_epoch=100).to(device).train()
    optimizer = build_optimizer(task_module, lr=1e-5)
    batch = synthetic_batch(
        task, args.batch, model.config.vision.image_size, model.config.text.vocab_size, args.length, device
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    forward = compiled(task_module) if args.compile else task_module

    def step(i: int) -> None:
        task_module.before_step(i)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = forward(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    if args.compare_matmul:
        return compare_matmul(task, step, args)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    samples_per_s = args.steps * args.batch / seconds
    flops = model_flops(task, model.config, args.length)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else dense_rate(device, dtype or torch.float32)
    result = {
        "task": task,
        "preset": args.preset,
        "params_m": round(model.num_parameters() / 1e6, 2),
        "batch": args.batch,
        "image_size": model.config.vision.image_size,
        "device": str(device),
        "amp": args.amp,
        "threads": torch.get_num_threads(),
        "steps_per_s": round(args.steps / seconds, 3),
        "samples_per_s": round(samples_per_s, 1),
        "compile": args.compile,
        "optimizer": ", ".join(f"{k}={v}" for k, v in adamw_kernel(list(task_module.parameters())).items())
        or "default",
        "model_gflops_per_sample": round(flops / 1e9, 2),
        "model_tflops_per_s": round(flops * samples_per_s / 1e12, 3),
        "peak_tflops": round(peak / 1e12, 3),
        "peak_kind": "given" if args.peak_tflops else "measured dense product",
        "mfu": round(flops * samples_per_s / peak, 4),
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def model_flops(task: str, config, length: int, answer_length: int = 4) -> float:
    """Matrix-product FLOPs of one training sample of `task` (the formula in the module docstring)."""
    v, t = config.vision, config.text
    dv, mv, lv, dt, mt, lt = (
        v.hidden_size,
        v.intermediate_size,
        v.num_hidden_layers,
        t.hidden_size,
        t.intermediate_size,
        t.num_hidden_layers,
    )
    patches = (v.image_size // v.patch_size) ** 2
    tv = patches + 1
    vit = lv * (tv * (8 * dv * dv + 4 * dv * mv) + 4 * tv * tv * dv) + 2 * 3 * v.patch_size**2 * dv * patches

    def text(n: int) -> float:
        return lt * (n * (8 * dt * dt + 4 * dt * mt) + 4 * n * n * dt)

    def cross(n: int) -> float:
        return lt * (4 * n * dt * dt + 4 * tv * dv * dt + 4 * n * tv * dt)

    def head(n: int) -> float:
        return n * (2 * dt * dt + 2 * dt * t.vocab_size)

    n = length
    if task == "caption":
        return 3 * (vit + text(n) + cross(n) + head(n))
    if task == "vqa":
        a = answer_length
        return 3 * (vit + text(n) + cross(n)) + 3 * 3 * (text(a) + cross(a) + head(a))
    contrastive = 3 * vit + vit + 3 * text(n) + text(n) + 3 * 3 * (text(n) + cross(n))
    if task == "retrieval":
        return contrastive
    return contrastive + 3 * (text(n) + cross(n) + head(n))  # pretrain


def dense_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a dense square matrix product in `dtype` on `device` (8192^3 on a GPU, 2048^3 on a CPU, there
    through the linears the model uses: `blip.models.kernels.linear`, oneDNN or MKL by the probe)."""
    from blip.models.kernels import linear

    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            linear(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def compare_matmul(task: str, step, args: argparse.Namespace) -> dict:
    """Median step time with our oneDNN linears and with F.linear, alternating blocks of `args.steps` steps."""
    import statistics

    from blip.models import kernels

    onednn = kernels.onednn_linear_available
    times: dict[str, list[float]] = {"onednn": [], "f_linear": []}
    for _ in range(args.rounds):
        for name in times:
            kernels.onednn_linear_available = onednn if name == "onednn" else (lambda: False)
            start = time.perf_counter()
            for i in range(args.steps):
                step(i)
            times[name].append((time.perf_counter() - start) / args.steps)
    kernels.onednn_linear_available = onednn
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    return {
        "task": task,
        "threads": torch.get_num_threads(),
        "onednn_available": onednn(),
        "onednn_ms_per_step": round(ms["onednn"], 1),
        "f_linear_ms_per_step": round(ms["f_linear"], 1),
        "speedup": round(ms["f_linear"] / ms["onednn"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["pretrain", "caption", "vqa", "retrieval"])
    parser.add_argument("--preset", default="blip_test")
    parser.add_argument("--vocab", default="shapes")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=128, help="ViT and text width (0 = the preset's)")
    parser.add_argument("--layers", type=int, default=3, help="ViT layers (0 = the preset's)")
    parser.add_argument("--text-layers", type=int, default=2, help="text layers (0 = the preset's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=20, help="caption tokens")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--compare-matmul", action="store_true", help="oneDNN vs F.linear training linears (CPU)")
    parser.add_argument("--rounds", type=int, default=6, help="--compare-matmul: alternating blocks per side")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="MFU against this peak (default: measured)")
    parser.add_argument("--out", default="runs/bench/train.json")
    args = parser.parse_args()
    results = []
    if not args.compare_matmul and torch.device(args.device).type == "cpu":
        from blip.models.kernels import cpu_matmul

        print(f"CPU linears: {cpu_matmul().describe()}")
    for task in args.tasks:
        results.append(bench(task, args))
        print(json.dumps(results[-1]))
        if "mfu" in results[-1]:
            r = results[-1]
            print(
                f"{task}: {r['samples_per_s']} samples/s, {r['model_gflops_per_sample']} GFLOP/sample, "
                f"{r['model_tflops_per_s']} TFLOP/s = MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']} TFLOP/s "
                f"({r['peak_kind']})"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
