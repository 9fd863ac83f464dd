"""The demo (`blip demo`) over several seeds, and the spread of its numbers.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --out runs/demo_seeds
    python benchmarks/demo_seeds.py --seeds 0 1 2 --out runs/demo_seeds --summarize-only   # tables of finished runs

Each seed is a full demo run in `<out>/seed<N>` (resumable: finished seeds and stages are kept; seed 0 of
`make demo` can be reused by linking runs/demo there). Writes `<out>/seeds.json` (per seed and mean / std / min /
max of every headline number) and prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

KEYS = (
    ("filter_precision", "filter precision (%)", 100.0),
    ("filter_recall", "filter recall (%)", 100.0),
    ("web.cider", "CIDEr, web", 1.0),
    ("capfilt.cider", "CIDEr, CapFilt", 1.0),
    ("web.bleu4", "BLEU-4, web", 1.0),
    ("capfilt.bleu4", "BLEU-4, CapFilt", 1.0),
    ("web.vqa_accuracy", "VQA acc, web", 1.0),
    ("capfilt.vqa_accuracy", "VQA acc, CapFilt", 1.0),
    ("web.retrieval_r1", "zero-shot R@1, web", 1.0),
    ("capfilt.retrieval_r1", "zero-shot R@1, CapFilt", 1.0),
    ("training_sets.web.false_rate", "false texts, web data (%)", 100.0),
    ("training_sets.capfilt.false_rate", "false texts, CapFilt data (%)", 100.0),
    ("total_seconds", "wall time (s)", 1.0),
)
COMPARED = ("cider", "bleu4", "vqa_accuracy", "retrieval_r1")


def _get(metrics: dict[str, Any], dotted: str) -> float:
    value: Any = metrics
    for part in dotted.split("."):
        value = value[part]
    return float(value)


def summarize(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    per_seed = {seed: {key: _get(m, key) * scale for key, _, scale in KEYS} for seed, m in runs.items()}
    spread = {}
    for key, _, _ in KEYS:
        values = [row[key] for row in per_seed.values()]
        spread[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    wins = {metric: sum(m["capfilt"][metric] > m["web"][metric] for m in runs.values()) for metric in COMPARED}
    deltas = {metric: [m["capfilt"][metric] - m["web"][metric] for m in runs.values()] for metric in COMPARED}
    return {"seeds": sorted(runs), "per_seed": per_seed, "spread": spread, "capfilt_wins": wins, "deltas": deltas}


def markdown(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    head = "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |"
    lines = [head, "|---" * (len(seeds) + 2) + "|"]
    for key, name, _ in KEYS:
        cells = " | ".join(f"{summary['per_seed'][s][key]:.1f}" for s in seeds)
        sp = summary["spread"][key]
        lines.append(f"| {name} | {cells} | {sp['mean']:.1f} ± {sp['std']:.1f} |")
    for metric in COMPARED:
        deltas = summary["deltas"][metric]
        cells = " | ".join(f"{d:+.1f}" for d in deltas)
        std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        lines.append(f"| **{metric}: CapFilt − web** | {cells} | {statistics.fmean(deltas):+.1f} ± {std:.1f} |")
    n = len(seeds)
    wins = ", ".join(f"{metric} {summary['capfilt_wins'][metric]}/{n}" for metric in COMPARED)
    lines.append("")
    lines.append(f"CapFilt above web (seeds): {wins}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo_seeds")
    parser.add_argument("--config", help="demo config file (default: configs/demo_shapes.py)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per run (default: the config's)")
    parser.add_argument("--summarize-only", action="store_true", help="only tabulate finished seeds")
    args = parser.parse_args(argv)
    from blip.demo import run_demo

    out = Path(args.out)
    runs = {}
    for seed in args.seeds:
        folder = out / f"seed{seed}"
        if not args.summarize_only:
            run_demo(folder, config=args.config, seed=seed, threads=args.threads)
        if (folder / "metrics.json").is_file():
            runs[seed] = json.loads((folder / "metrics.json").read_text())
    if not runs:
        print("no finished seeds", file=sys.stderr)
        return 1
    summary = summarize(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
