"""The demo (`blip demo`) over several seeds, and the spread of its numbers.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --out runs/demo_seeds
    python benchmarks/demo_seeds.py --seeds 0 1 2 --out runs/demo_seeds --summarize-only   # tables of finished runs
    python benchmarks/demo_seeds.py --seeds 0 1 2 --ablations        # + the paper's ablations (blip demo --ablations)

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
    ("vision.accuracy.kind", "ViT start: kind of the shape under a patch right (%)", 100.0),
    ("vision.accuracy.position", "ViT start: place of the shape under a patch right (%)", 100.0),
    ("filter_precision", "filter precision (%)", 100.0),
    ("filter_recall", "filter recall (%)", 100.0),
    ("filter.web.kept_correct_rate", "correct web captions kept (%)", 100.0),
    ("filter.synthetic.true_rate", "synthetic captions fully true (%)", 100.0),
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


def _has(metrics: dict[str, Any], dotted: str) -> bool:
    try:
        _get(metrics, dotted)
    except (KeyError, TypeError):
        return False
    return True


def _keys(runs: dict[int, dict[str, Any]]) -> list[tuple[str, str, float]]:
    """The rows every run has (a run with a random ViT start has no `vision`)."""
    return [row for row in KEYS if all(_has(m, row[0]) for m in runs.values())]


def summarize(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    keys = _keys(runs)
    per_seed = {seed: {key: _get(m, key) * scale for key, _, scale in keys} for seed, m in runs.items()}
    spread = {}
    for key, _, _ in keys:
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
        if key not in summary["spread"]:
            continue
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


ABLATION_KEYS = (
    ("cider", "CIDEr"),
    ("vqa_accuracy", "VQA acc"),
    ("retrieval_r1", "zs R@1"),
    ("data.false_rate", "false texts in pretraining (%)"),
    ("capfilt.synthetic_true_rate", "synthetic true (%)"),
    ("capfilt.synthetic_distinct_rate", "synthetic distinct (%)"),
    ("capfilt.false_synthetic_accepted", "false synthetic kept (%)"),
)


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def summarize_ablations(runs: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """Mean ± std of every arm's numbers over the seeds that ran `--ablations`, and on how many seeds each of the
    paper's claims held."""
    runs = {seed: m for seed, m in runs.items() if "ablation_findings" in m}
    if not runs:
        return None
    first = next(iter(runs.values()))["ablation_findings"]
    arms: dict[str, dict[str, list[float]]] = {}
    for m in runs.values():
        for arm, numbers in m["ablations"].items():
            for key, _ in ABLATION_KEYS:
                try:
                    value = _get(numbers, key)
                except KeyError:
                    continue
                scale = 100.0 if key.startswith(("data.", "capfilt.")) else 1.0
                arms.setdefault(arm, {}).setdefault(key, []).append(value * scale)
    held = {name: sum(m["ablation_findings"][name]["holds"] for m in runs.values()) for name in first}
    comparisons = {
        name: {
            what: {
                metric: sum(m["ablation_findings"][name]["comparisons"][what][metric] for m in runs.values())
                for metric in result
            }
            for what, result in finding["comparisons"].items()
        }
        for name, finding in first.items()
    }
    claims = {name: f["claim"] for name, f in first.items()}
    return {
        "seeds": sorted(runs),
        "arms": arms,
        "ablations": {name: f["arms"] for name, f in first.items()},
        "held": held,
        "comparisons": comparisons,
        "claims": claims,
    }


def ablations_markdown(summary: dict[str, Any]) -> str:
    n = len(summary["seeds"])
    lines = []
    for name, arm_names in summary["ablations"].items():
        lines.append(f"**{name}** — paper: {summary['claims'][name]}; holds on {summary['held'][name]}/{n} seeds")
        lines.append("")
        lines.append("| arm | " + " | ".join(label for _, label in ABLATION_KEYS) + " |")
        lines.append("|---" * (len(ABLATION_KEYS) + 1) + "|")
        for arm in arm_names:
            values = summary["arms"][arm]
            cells = [_mean_std(values[key]) if key in values else "–" for key, _ in ABLATION_KEYS]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        for what, result in summary["comparisons"][name].items():
            lines.append(f"- {what}: " + ", ".join(f"{metric} {k}/{n}" for metric, k in result.items()))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo_seeds")
    parser.add_argument("--config", help="demo config file (default: configs/demo_shapes.py)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per run (default: the config's)")
    parser.add_argument("--summarize-only", action="store_true", help="only tabulate finished seeds")
    parser.add_argument(
        "--ablations", action="store_true", help="run the paper's ablations too (blip demo --ablations)"
    )
    args = parser.parse_args(argv)
    from blip.demo import run_demo

    out = Path(args.out)
    runs = {}
    for seed in args.seeds:
        folder = out / f"seed{seed}"
        if not args.summarize_only:
            run_demo(folder, config=args.config, seed=seed, threads=args.threads, ablations=args.ablations)
        if (folder / "metrics.json").is_file():
            runs[seed] = json.loads((folder / "metrics.json").read_text())
    if not runs:
        print("no finished seeds", file=sys.stderr)
        return 1
    summary = summarize(runs)
    ablations = summarize_ablations(runs)
    if ablations:
        summary["ablations"] = ablations
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(summary))
    if ablations:
        print()
        print(ablations_markdown(ablations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
