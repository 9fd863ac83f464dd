"""`blip demo --ablations`: the paper's CapFilt ablations on the shapes world, after the demo's own two arms.

Every arm pretrains the same architecture from scratch with the same steps, schedule and seed on its own data, then
gets the demo's fine-tuning budget for captioning and VQA and its zero-shot retrieval test, exactly as the demo's
`web` and `capfilt` arms (which are reused, not rerun). The arms:

- `web`, `capfilt`: the demo's two arms (web + clean captions; CapFilt's bootstrapped data);
- `captioner_only`: every web text and every synthetic caption, unfiltered (+ clean) - paper Table 1 "C";
- `filter_only`: the web texts the filter keeps, no synthetic captions (+ clean) - paper Table 1 "F";
- `beam`: CapFilt with beam search (width 3) instead of nucleus sampling - paper Table 2;
- `shared`: one model fine-tuned as captioner and filter at once (ITC + ITM + LM on the filter's clean captions, the
  text encoder and decoder sharing all but self-attention, as in pretraining), used for both roles - paper Table 3;
- `round2`: a second round - captioner and filter fine-tuned from the `capfilt` arm's pretrained model, CapFilt of
  the web split again, a new model pretrained on the result.

Which arms each ablation compares: `ABLATIONS`. `metrics.json` gets `ablations` (every arm's numbers, keyed by arm)
and `ablation_findings` (`findings`). Each arm's data is described by `dataset_makeup` (texts, false texts
by origin, checked against the true scenes); CapFilt arms also by `analyse_capfilt` (the filter's removal rates by
noise kind, the synthetic captions' true share and the filter's acceptance of false ones).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip.io import atomic_path

if TYPE_CHECKING:
    from blip.demo.stages import DemoConfig, Stages

ABLATIONS: dict[str, tuple[str, ...]] = {
    "effect": ("web", "captioner_only", "filter_only", "capfilt"),  # paper Table 1
    "diversity": ("capfilt", "beam"),  # Table 2: nucleus sampling vs beam search
    "sharing": ("capfilt", "shared"),  # Table 3: captioner and filter separate vs sharing parameters
    "rounds": ("capfilt", "round2"),  # bootstrapping again from the CapFilt model
}
ARMS: tuple[str, ...] = tuple(dict.fromkeys(arm for arms in ABLATIONS.values() for arm in arms))


def stage_count(cfg: DemoConfig) -> int:
    """Stages `run_ablations` adds to the demo's: per arm it trains (all but web and capfilt) a pretraining, its
    captioning fine-tunes and a VQA fine-tune; 2 data variants, beam's CapFilt, the shared model and its CapFilt,
    and round 2's captioner, filter and CapFilt."""
    return (len(ARMS) - 2) * (2 + cfg.caption_finetunes) + 8


BEAM_WIDTH = 3


def dataset_makeup(dataset: Path, records: Path) -> dict[str, Any]:
    """Texts of a bootstrapped dataset by origin (web / synthetic / clean) and how many are false for their image
    (web and synthetic texts checked against the scene in CapFilt's records of `records`; clean texts are true)."""
    from blip.capfilt import read_records
    from blip.data.shapes import Scene, check_caption

    scenes = {r["id"]: Scene.from_dict(r["scene"]) for r in read_records(records)}
    texts: Counter = Counter()
    false: Counter = Counter()
    with open(dataset, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            origin = row["origin"]
            texts[origin] += 1
            if origin != "clean":
                false[origin] += not check_caption(scenes[row["id"]], row["caption"])
    total = sum(texts.values())
    return {
        "texts": total,
        "by_origin": {o: {"texts": texts[o], "false": false[o]} for o in ("web", "synthetic", "clean")},
        "false": sum(false.values()),
        "false_rate": sum(false.values()) / total if total else 0.0,
    }


def web_makeup(records: Path, clean_manifest: Path) -> dict[str, Any]:
    """`dataset_makeup` of the web arm's pretraining data: every web text (checked against its scene) + the clean
    captions."""
    from blip.capfilt import read_records
    from blip.data.shapes import Scene, check_caption

    web = false = 0
    for record in read_records(records):
        if record["web_text"]:
            web += 1
            false += not check_caption(Scene.from_dict(record["scene"]), record["web_text"])
    with open(clean_manifest, encoding="utf-8") as f:
        clean = sum(len(json.loads(line)["captions"]) for line in f if line.strip())
    return {
        "texts": web + clean,
        "by_origin": {
            "web": {"texts": web, "false": false},
            "synthetic": {"texts": 0, "false": 0},
            "clean": {"texts": clean, "false": 0},
        },
        "false": false,
        "false_rate": false / (web + clean) if web + clean else 0.0,
    }


def write_variant(
    records: Path, clean_manifest: Path, out: Path, *, web: str, synthetic: str, data_dir: Path
) -> dict[str, Any]:
    """A bootstrapped dataset from CapFilt's records (image paths relative to `data_dir`, the world's folder) with
    other rules: `web` / `synthetic` each "all", "kept" (the filter's verdict) or "none"; the clean captions always
    (the layout of `bootstrap.jsonl`)."""
    from blip.capfilt import read_records
    from blip.capfilt.core import _clean_rows

    def take(rule: str, keep: bool) -> bool:
        return rule == "all" or (rule == "kept" and keep)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in read_records(records):
            image = record["image"]
            image = image if Path(image).is_absolute() else str((data_dir / image).resolve())
            rows = [("web", record["web_text"])] if record["web_text"] and take(web, record["web_keep"]) else []
            rows += [("synthetic", s["text"]) for s in record["synthetic"] if s["text"] and take(synthetic, s["keep"])]
            for origin, text in rows:
                f.write(json.dumps({"image": image, "caption": text, "origin": origin, "id": record["id"]}) + "\n")
        for row in _clean_rows(str(clean_manifest)):  # as `blip capfilt --keep-clean` adds them
            f.write(json.dumps(row) + "\n")
    return {"dataset": str(out)}


def run_ablations(
    cfg: DemoConfig,
    out: Path,
    stages: Stages,
    data_dir: Path,
    main: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The arms beyond the demo's two (see the module docstring). `main`: the demo's results by name (`pre_web`,
    `cap_web`, `filter`, `pre_capfilt`, and `arms`: the headline numbers of `web` and `capfilt`). Returns
    every arm's numbers, keyed by arm (`metrics.json`'s `ablations`; `findings` reads them)."""
    from blip.demo.stages import (
        analyse_capfilt,
        arm_result,
        finetune,
        pretraining_clean,
        run_capfilt_stage,
        train_arm,
        train_filter,
    )

    root = out / "ablations"
    clean = pretraining_clean(cfg, data_dir)
    records = out / "capfilt_data"
    manifests = (out / "filter" / "filter_train.jsonl", out / "filter" / "filter_val.jsonl")  # the filter's, reused
    arms: dict[str, dict[str, Any]] = {}
    for name in ("web", "capfilt"):
        arms[name] = dict(main["arms"][name])
    arms["web"]["data"] = web_makeup(records, clean)
    arms["capfilt"]["capfilt"] = _capfilt_numbers(main["analysis"])
    arms["capfilt"]["data"] = dataset_makeup(out / "capfilt_data" / "bootstrap.jsonl", records)

    def arm(name: str, dataset: str, capfilt_folder: Path, threshold: float | None) -> None:
        results = train_arm(cfg, stages, name, dataset, root / name, data_dir)
        arms[name] = arm_result(results)
        arms[name]["data"] = dataset_makeup(Path(dataset), capfilt_folder)
        if threshold is not None:
            arms[name]["capfilt"] = _capfilt_numbers(analyse_capfilt(capfilt_folder, threshold))

    # Table 1: captioner only, filter only.
    for name, web, synthetic in (("captioner_only", "all", "all"), ("filter_only", "kept", "none")):
        made = stages.run(
            f"data_{name}",
            root / name / "data",
            f"{name}: web texts {web}, synthetic captions {synthetic}, + clean",
            lambda name=name, web=web, synthetic=synthetic: write_variant(
                records,
                clean,
                root / name / "data" / "bootstrap.jsonl",
                web=web,
                synthetic=synthetic,
                data_dir=data_dir,
            ),
        )
        arm(name, made["dataset"], records, None)

    # Table 2: beam search instead of nucleus sampling.
    beam_cfg = cfg.replace(capfilt=dataclasses.replace(cfg.capfilt, num_beams=BEAM_WIDTH))
    beam = stages.run(
        "capfilt_beam",
        root / "beam" / "capfilt_data",
        f"CapFilt with beam search (width {BEAM_WIDTH})",
        lambda: run_capfilt_stage(
            beam_cfg,
            main["cap_web"]["model"],
            main["filter"]["model"],
            main["filter"],
            data_dir,
            root / "beam" / "capfilt_data",
        ),
    )
    arm("beam", beam["dataset"], root / "beam" / "capfilt_data", main["filter"]["threshold"])

    # Table 3: captioner and filter sharing parameters: the pretraining objectives (ITC + ITM + LM, encoder and decoder
    # sharing all but self-attention) fine-tuned on the filter's data with its schedule; the model captions unprompted.
    shared_base = cfg.filter.replace(task="pretrain", share_text_layers=True)
    shared = stages.run(
        "shared_model",
        root / "shared" / "model",
        "fine-tune one model as captioner and filter (ITC + ITM + LM, shared layers)",
        lambda: train_filter(
            cfg,
            main["pre_web"]["checkpoint"],
            data_dir,
            root / "shared" / "model",
            base=shared_base,
            manifests=manifests,
        ),
    )
    shared_cfg = cfg.replace(capfilt=dataclasses.replace(cfg.capfilt, prompt=""))  # the LM was trained unprompted
    shared_cf = stages.run(
        "capfilt_shared",
        root / "shared" / "capfilt_data",
        "CapFilt with the shared model as captioner and filter",
        lambda: run_capfilt_stage(
            shared_cfg,
            shared["model"],
            shared["model"],
            shared,
            data_dir,
            root / "shared" / "capfilt_data",
        ),
    )
    arm("shared", shared_cf["dataset"], root / "shared" / "capfilt_data", shared["threshold"])
    arms["shared"]["filter_validation"] = shared["validation"]

    # A second round, from the CapFilt model.
    init = main["pre_capfilt"]["checkpoint"]
    cap2 = stages.run(
        "captioner_round2",
        root / "round2" / "captioner",
        "round 2: fine-tune a captioner from the CapFilt model",
        lambda: finetune(cfg, cfg.caption, init, data_dir, root / "round2" / "captioner"),
    )
    filt2 = stages.run(
        "filter_round2",
        root / "round2" / "filter",
        "round 2: fine-tune a filter from the CapFilt model, choose its threshold",
        lambda: train_filter(cfg, init, data_dir, root / "round2" / "filter", manifests=manifests),
    )
    cf2 = stages.run(
        "capfilt_round2",
        root / "round2" / "capfilt_data",
        "round 2: CapFilt of the web split",
        lambda: run_capfilt_stage(
            cfg, cap2["model"], filt2["model"], filt2, data_dir, root / "round2" / "capfilt_data"
        ),
    )
    arm("round2", cf2["dataset"], root / "round2" / "capfilt_data", filt2["threshold"])
    arms["round2"]["filter_validation"] = filt2["validation"]
    return {name: arms[name] for name in ARMS}


def _capfilt_numbers(analysis: dict[str, Any]) -> dict[str, Any]:
    """An arm's CapFilt numbers from `analyse_capfilt`'s analysis of its records."""
    synth = analysis["synthetic"]
    false = synth["texts"] - synth["true"]
    kept_false = synth["kept"] - synth["kept_true"]
    return {
        "threshold": analysis["threshold"],
        "filter_precision": analysis["web"]["precision"],
        "filter_recall": analysis["web"]["recall"],
        "web_removed_by_noise": {
            k: v["removed"] / v["texts"] for k, v in analysis["web"]["by_noise"].items() if v["texts"]
        },
        "synthetic_true_rate": synth["true_rate"],
        "synthetic_distinct_rate": synth["distinct_rate"],
        "false_synthetic_accepted": kept_false / false if false else 0.0,
        "true_synthetic_accepted": synth["kept_true"] / synth["true"] if synth["true"] else 0.0,
    }


# What the paper found, as comparisons of arms on the downstream numbers (`metrics.json` keys of an arm).
DOWNSTREAM = ("cider", "vqa_accuracy", "retrieval_r1")
CLAIMS: dict[str, str] = {
    "effect": "captioner and filter each help, and together most (Table 1: C+F > C, F > web)",
    "diversity": "nucleus sampling beats beam search downstream although more of its captions are noisy (Table 2)",
    "sharing": "a filter that shares parameters with the captioner accepts more of its false captions, and "
    "downstream results drop (Table 3)",
    "rounds": "bootstrapping again from the CapFilt model helps further (the larger-model result)",
}


# The two-arm comparisons each ablation rests on: label -> (the arm the paper expects to win, the other).
ARM_PAIRS: dict[str, dict[str, tuple[str, str]]] = {
    "effect": {
        "capfilt > captioner_only": ("capfilt", "captioner_only"),
        "capfilt > filter_only": ("capfilt", "filter_only"),
        "captioner_only > web": ("captioner_only", "web"),
        "filter_only > web": ("filter_only", "web"),
    },
    "diversity": {"capfilt (nucleus) > beam": ("capfilt", "beam")},
    "sharing": {"capfilt (separate) > shared": ("capfilt", "shared")},
    "rounds": {"round2 > capfilt": ("round2", "capfilt")},
}


def _wins(arms: dict[str, dict[str, Any]], better: str, worse: str) -> dict[str, bool]:
    return {k: arms[better][k] > arms[worse][k] for k in DOWNSTREAM}


def findings(arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each ablation (`metrics.json`'s `ablation_findings`): the arms it compares, the paper's claim, the
    comparisons it rests on (metric -> does the paper's side win here), and `holds`: every comparison goes the
    paper's way."""
    out: dict[str, dict[str, Any]] = {}
    comparisons = {name: {what: _wins(arms, *pair) for what, pair in two.items()} for name, two in ARM_PAIRS.items()}
    nucleus, beam = arms["capfilt"].get("capfilt", {}), arms["beam"].get("capfilt", {})
    comparisons["diversity"]["nucleus captions noisier than beam"] = {
        "synthetic_false_rate": nucleus.get("synthetic_true_rate", 0) < beam.get("synthetic_true_rate", 0)
    }
    separate, shared = arms["capfilt"].get("capfilt", {}), arms["shared"].get("capfilt", {})
    comparisons["sharing"]["shared filter accepts more false synthetic captions"] = {
        "false_synthetic_accepted": shared.get("false_synthetic_accepted", 0)
        > separate.get("false_synthetic_accepted", 0)
    }
    for name, checks in comparisons.items():
        out[name] = {
            "arms": list(ABLATIONS[name]),
            "claim": CLAIMS[name],
            "comparisons": checks,
            "holds": all(v for c in checks.values() for v in c.values()),
        }
    return out
