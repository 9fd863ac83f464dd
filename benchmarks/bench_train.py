"""Training throughput per task: optimizer steps/s, samples/s and peak memory on synthetic batches.

    python benchmarks/bench_train.py                                   # the shapes model on CPU
    python benchmarks/bench_train.py --compare-matmul                  # oneDNN vs F.linear training linears (CPU)
    python benchmarks/bench_train.py --preset blip_base_pretrain --image-size 224 --batch 32 --device cuda --amp bf16

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
from blip.train.modeling import build_model
from blip.train.optim import build_optimizer
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

    def step(i: int) -> None:
        task_module.before_step(i)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = task_module(batch)["loss"]
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
        "samples_per_s": round(args.steps * args.batch / seconds, 1),
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


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
    parser.add_argument("--out", default="runs/bench/train.json")
    args = parser.parse_args()
    results = []
    for task in args.tasks:
        results.append(bench(task, args))
        print(json.dumps(results[-1]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
