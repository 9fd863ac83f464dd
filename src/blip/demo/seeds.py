"""The demo over several seeds (`blip demo --seeds 0 1 2 [--ablations]`) and the spread of its numbers.

    run_seeds(out, [0, 1, 2], ablations=True)
        out/seed0/ ...        one full demo run per seed (`run_demo`: resumable, finished stages are kept)
        out/seeds.json        per seed and mean / std / min / max of every headline number; with --ablations, every
                              arm's numbers as mean ± std and on how many seeds each of the paper's claims held
        out/seeds.md          the same as Markdown tables (what the README quotes)
        out/report.html       the same as a page, linking each seed's own report

One seed's differences of a few points can be noise (VQA especially: fine-tuning decides when counting clicks);
this is how the README's tables are made.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from blip.demo.ablations import ARM_PAIRS
from blip.demo.stages import DemoConfig, DemoConfigError, print_line, run_demo
from blip.io import atomic_write_bytes, atomic_write_json

# (dotted key in a run's metrics.json, row label, scale to the printed unit)
HEADLINE: tuple[tuple[str, str, float], ...] = (
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
    ("demo_seconds", "wall time of the demo's stages (s)", 1.0),
    ("total_seconds", "wall time, ablations included (s)", 1.0),
)
COMPARED = ("cider", "bleu4", "vqa_accuracy", "retrieval_r1")
# (dotted key in an arm's numbers, column label); rates (data., capfilt.) are printed in %
ARM_COLUMNS: tuple[tuple[str, str], ...] = (
    ("cider", "CIDEr"),
    ("vqa_accuracy", "VQA acc"),
    ("retrieval_r1", "zs R@1"),
    ("data.false_rate", "false texts in pretraining (%)"),
    ("capfilt.synthetic_true_rate", "synthetic true (%)"),
    ("capfilt.synthetic_distinct_rate", "synthetic distinct (%)"),
    ("capfilt.false_synthetic_accepted", "false synthetic kept (%)"),
)

Table = tuple[list[str], list[list[str]]]  # header, rows of cells


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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std; 0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: Sequence[float], sign: str = "") -> str:
    mean, std = mean_std(values)
    return f"{mean:{sign}.1f} ± {std:.1f}"


def summarize(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers of several seeds' `metrics.json` (rows every run has: a run with a random ViT start has
    no `vision`), their spread, CapFilt − web per seed and on how many seeds CapFilt was above web."""
    keys = [row for row in HEADLINE if all(_has(m, row[0]) for m in runs.values())]
    per_seed = {seed: {key: _get(m, key) * scale for key, _, scale in keys} for seed, m in sorted(runs.items())}
    spread = {}
    for key, _, _ in keys:
        values = [row[key] for row in per_seed.values()]
        mean, std = mean_std(values)
        spread[key] = {"mean": mean, "std": std, "min": min(values), "max": max(values)}
    ordered = [runs[seed] for seed in sorted(runs)]
    return {
        "seeds": sorted(runs),
        "per_seed": per_seed,
        "spread": spread,
        "capfilt_wins": {k: sum(m["capfilt"][k] > m["web"][k] for m in ordered) for k in COMPARED},
        "deltas": {k: [m["capfilt"][k] - m["web"][k] for m in ordered] for k in COMPARED},
    }


def summarize_ablations(runs: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """Every arm's numbers (`ARM_COLUMNS`) over the seeds that ran the ablations, and on how many seeds each of the
    paper's claims, and each comparison it rests on, went the paper's way. None when no seed ran them."""
    runs = {seed: m for seed, m in sorted(runs.items()) if "ablation_findings" in m}
    if not runs:
        return None
    first = next(iter(runs.values()))["ablation_findings"]
    arms: dict[str, dict[str, list[float]]] = {}
    for m in runs.values():
        for arm, numbers in m["ablations"].items():
            for key, _ in ARM_COLUMNS:
                if _has(numbers, key):
                    scale = 100.0 if key.startswith(("data.", "capfilt.")) else 1.0
                    arms.setdefault(arm, {}).setdefault(key, []).append(_get(numbers, key) * scale)
    return {
        "seeds": list(runs),
        "arms": arms,
        "ablations": {name: f["arms"] for name, f in first.items()},
        "claims": {name: f["claim"] for name, f in first.items()},
        "held": {name: sum(m["ablation_findings"][name]["holds"] for m in runs.values()) for name in first},
        "comparisons": {
            name: {
                what: {
                    metric: sum(m["ablation_findings"][name]["comparisons"][what][metric] for m in runs.values())
                    for metric in result
                }
                for what, result in finding["comparisons"].items()
            }
            for name, finding in first.items()
        },
        "deltas": {
            name: {what: _paired_deltas(runs, what, result) for what, result in finding["comparisons"].items()}
            for name, finding in first.items()
        },
    }


_PAIRS = {what: pair for pairs in ARM_PAIRS.values() for what, pair in pairs.items()}


def _paired_deltas(runs: dict[int, dict[str, Any]], what: str, result: dict[str, Any]) -> dict[str, list[float]]:
    """For a comparison of two arms (`ARM_PAIRS`), a − b per seed for each of its metrics; {} for other comparisons."""
    if what not in _PAIRS:
        return {}
    a, b = _PAIRS[what]
    return {metric: [m["ablations"][a][metric] - m["ablations"][b][metric] for m in runs.values()] for metric in result}


def headline_table(summary: dict[str, Any]) -> Table:
    seeds = summary["seeds"]
    header = ["", *(f"seed {s}" for s in seeds), "mean ± std"]
    rows = []
    for key, label, _ in HEADLINE:
        if key in summary["spread"]:
            sp = summary["spread"][key]
            cells = [f"{summary['per_seed'][s][key]:.1f}" for s in seeds]
            rows.append([label, *cells, f"{sp['mean']:.1f} ± {sp['std']:.1f}"])
    for metric in COMPARED:
        deltas = summary["deltas"][metric]
        rows.append([f"{metric}: CapFilt − web", *(f"{d:+.1f}" for d in deltas), _pm(deltas, "+")])
    return header, rows


def ablation_tables(ablations: dict[str, Any]) -> list[dict[str, Any]]:
    """Per ablation: its name, the paper's claim, on how many seeds it held, a table of its arms (mean ± std) and the
    comparisons it rests on (how many seeds went the paper's way, per metric, and for two arms their difference,
    mean ± std over the seeds)."""
    n = len(ablations["seeds"])
    out = []
    for name, arms in ablations["ablations"].items():
        header = ["arm", *(label for _, label in ARM_COLUMNS)]
        numbers = ablations["arms"]
        rows = [[arm, *(_pm(numbers[arm][k]) if k in numbers[arm] else "–" for k, _ in ARM_COLUMNS)] for arm in arms]
        deltas = ablations["deltas"][name]
        comparisons = [
            f"{what}: "
            + ", ".join(
                f"{metric} {k}/{n}" + (f" ({_pm(deltas[what][metric], '+')})" if metric in deltas[what] else "")
                for metric, k in result.items()
            )
            for what, result in ablations["comparisons"][name].items()
        ]
        out.append(
            {
                "name": name,
                "claim": ablations["claims"][name],
                "held": f"{ablations['held'][name]}/{n}",
                "table": (header, rows),
                "comparisons": comparisons,
            }
        )
    return out


def _markdown_table(table: Table) -> list[str]:
    header, rows = table
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(summary: dict[str, Any]) -> str:
    n = len(summary["seeds"])
    lines = _markdown_table(headline_table(summary))
    wins = ", ".join(f"{metric} {summary['capfilt_wins'][metric]}/{n}" for metric in COMPARED)
    lines += ["", f"CapFilt above web (seeds): {wins}"]
    for ablation in ablation_tables(summary["ablations"]) if summary.get("ablations") else []:
        lines += ["", f"**{ablation['name']}** — paper: {ablation['claim']}; holds on {ablation['held']} seeds", ""]
        lines += _markdown_table(ablation["table"])
        lines += [f"- {c}" for c in ablation["comparisons"]]
    return "\n".join(lines) + "\n"


def run_seeds(
    out: Path | str,
    seeds: Sequence[int],
    *,
    config: DemoConfig | str | Path | None = None,
    threads: int | None = None,
    processes: int | None = None,
    smoke: bool = False,
    ablations: bool = False,
    say: Callable[[str], None] = print_line,
) -> int:
    """Run (or resume) the demo for each seed into `out/seed<N>`, then write `seeds.json`, `seeds.md` and
    `report.html` into `out`; returns the exit code (0)."""
    from blip.demo.report import write_seeds_report

    if not seeds or len(set(seeds)) != len(seeds):
        raise DemoConfigError(f"seeds must be distinct and at least one, got {list(seeds)}")
    out = Path(out).resolve()
    if (out / "demo_config.json").is_file():  # its report.html would be overwritten by the seeds' one
        raise DemoConfigError(f"{out} holds a single-seed demo run; choose another --out for several seeds")
    runs = {}
    for i, seed in enumerate(seeds, 1):
        say(f"== seed {seed} ({i}/{len(seeds)}) ==")
        folder = out / f"seed{seed}"
        run_demo(
            folder,
            config=config,
            seed=seed,
            threads=threads,
            processes=processes,
            smoke=smoke,
            ablations=ablations,
            say=say,
        )
        runs[seed] = json.loads((folder / "metrics.json").read_text())
    summary = summarize(runs)
    summary["ablations"] = summarize_ablations(runs)
    atomic_write_json(out / "seeds.json", summary)
    atomic_write_bytes(out / "seeds.md", markdown(summary).encode())
    report = write_seeds_report(out, summary)
    say(markdown(summary))
    say(f"seeds {', '.join(map(str, seeds))}: {out / 'seeds.json'}, {report}")
    return 0
