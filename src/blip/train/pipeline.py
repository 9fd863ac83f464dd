"""The shapes-world training chain, end to end: untrained baselines -> pretrain -> caption / VQA / retrieval fine-tunes.

    python -m blip.train.pipeline --out runs/shapes_pipeline --threads 1  # 22.5 min measured on a 2-core CPU
    python -m blip.train.pipeline --out runs/smoke_pipeline --smoke     # seconds

Each stage is a config file of `configs/` (`--configs DIR`) run through `blip.train.recipe.run` with its output folder
moved under `--out`; a finished stage is not run again (delete its folder to redo it), an interrupted one resumes.
The report (`report.json`, `report.png`) sets every test metric of the trained models against the same architecture
untrained and against chance / a blind VQA baseline (the most common training answer of each question).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from blip.train.config import TrainConfig, load_config_file

_logger = logging.getLogger(__name__)

STAGES = ("pretrain", "caption", "vqa", "retrieval")
HEADLINE = {"caption": "cider", "vqa": "accuracy", "retrieval": "tr_r1"}


def _stage_config(configs: Path, stage: str, out: Path, smoke: bool, threads: int) -> TrainConfig:
    cfg = load_config_file(configs / f"{stage}_shapes.py", smoke=smoke)
    changes: dict[str, Any] = {"out_dir": str(out / stage), "threads": threads}
    if stage != "pretrain":
        changes["init"] = str(out / "pretrain" / "checkpoint.pt")
    return cfg.replace(**changes)


def blind_vqa_baseline(data: str, max_images: int = 0) -> float:
    """Accuracy of answering every test question with its most common training answer (no image)."""
    from blip.evaluation import vqa_evaluate
    from blip.evaluation.run import question_rows

    per_question: dict[str, Counter] = defaultdict(Counter)
    with (Path(data) / "vqa.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            per_question[row["question"]][row["answer"]] += 1
    overall = Counter(a for c in per_question.values() for a in c.elements())
    test = question_rows(data, max_images=max_images)
    predictions = [(per_question[q.question] or overall).most_common(1)[0][0] for q in test]
    return vqa_evaluate(predictions, [list(q.answers) for q in test]).overall


def evaluate_untrained(cfg: TrainConfig, task: str) -> dict[str, float]:
    """The stage's architecture, randomly initialised, on the same test split."""
    from blip.api import Blip
    from blip.evaluation.run import evaluate
    from blip.train.modeling import build_model

    torch.manual_seed(cfg.seed)
    model, tokenizer = build_model(cfg.replace(init="", task=task))
    blip_model = Blip.from_model(model, tokenizer)
    return evaluate(
        blip_model,
        task,
        cfg.eval_data,
        max_images=cfg.eval_max_images,
        prompt=cfg.prompt if task == "caption" else "",
        num_beams=cfg.eval_num_beams if task == "caption" else None,
        min_new_tokens=cfg.eval_min_new_tokens,
        k_test=cfg.eval_k_test,
    ).metrics


def run_pipeline(out: Path, configs: Path, *, smoke: bool = False, threads: int = 0) -> dict[str, Any]:
    from blip.train.recipe import ensure_shapes, run

    out.mkdir(parents=True, exist_ok=True)
    cfgs = {stage: _stage_config(configs, stage, out, smoke, threads) for stage in STAGES}
    ensure_shapes(cfgs["pretrain"])
    if threads:
        torch.set_num_threads(threads)
    report: dict[str, Any] = {"smoke": smoke, "stages": {}, "untrained": {}, "baselines": {}}
    first = cfgs["caption"]
    for task in HEADLINE:
        report["untrained"][task] = evaluate_untrained(cfgs[task], task)
        _logger.info("untrained %s: %s", task, report["untrained"][task])
    n_images = first.eval_max_images or len((Path(first.eval_data) / "test.jsonl").read_text().splitlines())
    report["baselines"] = {
        "retrieval_chance_r1": 100.0 / n_images,
        "vqa_blind": blind_vqa_baseline(cfgs["vqa"].eval_data, cfgs["vqa"].eval_max_images),
    }
    for stage in STAGES:
        summary_path = out / stage / "summary.json"
        if summary_path.is_file() and json.loads(summary_path.read_text()).get("finished"):
            _logger.info("%s: already done (%s)", stage, summary_path)
            summary = json.loads(summary_path.read_text())
        else:
            summary = run(cfgs[stage]).to_dict()
        report["stages"][stage] = {
            "seconds": summary["seconds"],
            "steps": summary["step"],
            "final_losses": summary["losses"],
            "test": summary["evaluation"],
        }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "report.png")
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    from blip.evaluation.plots import plot_metrics

    before, after = {}, {}
    for task, metric in HEADLINE.items():
        name = f"{task} {metric}"
        scale = 100.0 if task == "caption" else 1.0  # CIDEr as the papers print it
        before[name] = report["untrained"][task][metric] * scale
        after[name] = report["stages"][task]["test"].get(task, {}).get(metric, 0.0) * scale
    baseline = {
        "caption cider": 0.0,
        "vqa accuracy": report["baselines"]["vqa_blind"],
        "retrieval tr_r1": report["baselines"]["retrieval_chance_r1"],
    }
    compare = {"untrained": before, "chance / blind": baseline, "trained": after}
    plot_metrics(after, path, title="shapes world: test metrics", compare=compare)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip.train.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/shapes_pipeline")
    parser.add_argument("--configs", default="configs", help="folder with {pretrain,caption,vqa,retrieval}_shapes.py")
    parser.add_argument("--smoke", action="store_true", help="tiny data, a few steps per stage")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_pipeline(Path(args.out), Path(args.configs), smoke=args.smoke, threads=args.threads)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
