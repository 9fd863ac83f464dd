"""`blip demo` end to end at toy size: every stage runs, metrics.json has the demo's numbers, the report is written,
and a rerun keeps the finished stages. (The full-size demo is `make demo`, outside the suite.)"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blip.demo import DemoConfigError, load_demo_config, pretrain, pretraining_clean, run_demo
from blip.weights.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_shapes.py"
STAGES = (
    "data",
    "baselines",
    "vision",
    "pretrain_web",
    "captioner",
    "filter",
    "capfilt",
    "pretrain_capfilt",
    "caption_capfilt",
    "vqa_web",
    "vqa_capfilt",
    "caption_web_2",  # smoke: two captioning fine-tunes per arm
    "caption_capfilt_2",
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    assert run_demo(out, config=load_demo_config(CONFIG, smoke=True), say=lines.append) == 0
    return out, lines


def test_demo_writes_metrics_and_report(demo_run):
    out, lines = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("filter_precision", "filter_recall"):
        assert 0.0 <= metrics[key] <= 1.0
    for arm in ("web", "capfilt"):
        for key in ("cider", "bleu4", "vqa_accuracy", "retrieval_r1"):
            assert isinstance(metrics[arm][key], float), (arm, key)
    assert set(metrics["timings"]) == set(metrics["stage_threads"]) == set(STAGES)
    assert set(metrics["stage_threads"].values()) == {metrics["threads"]} == {2}  # the config's, as each stage ran
    assert metrics["baselines"]["chance"]["retrieval_r1"] == pytest.approx(100 / 8)
    sets = metrics["training_sets"]
    # smoke: 16 clean images, 4 of them held out for the filter's threshold
    assert sets["web"]["web"] == 48 and sets["web"]["clean"] == sets["capfilt"]["clean"] == (16 - 4) * 5
    # each pretraining run reads every text of its set (the clean captions included)
    for arm in ("web", "capfilt"):
        assert metrics[arm]["pretrain_pairs"] == sets[arm]["texts"]
    # the filter's counts add up: every web caption is kept or removed, by noise kind
    web = metrics["filter"]["web"]
    assert sum(v["texts"] for v in web["by_noise"].values()) == web["texts"] == 48
    assert sum(v["removed"] for v in web["by_noise"].values()) == web["removed"]

    page = (out / "report.html").read_text()
    for png in ("report_metrics.png", "report_filter.png", "report_data.png", "report_losses.png"):
        assert (out / png).stat().st_size > 1000
        assert png in page
    assert "precision" in page and "data:image/png;base64," in page
    assert "Captioning is fine-tuned 2 times per arm" in page
    assert any("the mean of 2 captioning fine-tunes per arm" in line for line in lines)
    assert any(line.startswith("[13/13] caption_capfilt_2: done") for line in lines)
    assert any("filter on web captions: precision" in line for line in lines)


def test_an_arms_captioning_numbers_are_the_mean_of_its_fine_tunes_each_with_its_own_seed(demo_run):
    out, _ = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    for arm in ("web", "capfilt"):
        draws = metrics[arm]["caption_finetunes"]
        assert len(draws) == 2
        for key in ("cider", "bleu4", "rouge_l"):
            assert metrics[arm][key] == pytest.approx(sum(d[key] for d in draws) / 2)
        configs = [json.loads((out / arm / f / "config.json").read_text()) for f in ("caption", "caption_2")]
        assert [c["seed"] for c in configs] == [0, 1000]  # the demo's seed, then seed + 1000
        assert configs[0]["init"] == configs[1]["init"] == str(out / arm / "pretrain" / "checkpoint.pt")
        evaluated = [
            json.loads((out / arm / f / "summary.json").read_text())["evaluation"] for f in ("caption", "caption_2")
        ]
        assert [100 * e["caption"]["cider"] for e in evaluated] == pytest.approx([d["cider"] for d in draws])
    # the web arm's first fine-tune is the captioner CapFilt used
    assert metrics["captioner"] == metrics["web"]["caption_finetunes"][0]
    with pytest.raises(ValueError, match="caption_finetunes"):
        load_demo_config(CONFIG, smoke=True).replace(caption_finetunes=0)


def test_stages_side_by_side_run_in_one_thread_processes_keep_finished_ones_and_raise_a_failure(tmp_path):
    from blip.demo.stages import Stage, Stages

    lines: list[str] = []
    stages = Stages(total=3, say=lines.append)
    jobs = [Stage(n, tmp_path / n, f"parse {n}", json.loads, (json.dumps({"n": n}),)) for n in ("a", "b", "c")]
    t0 = time.perf_counter()
    assert stages.run_side_by_side(jobs, processes=2) == {n: {"n": n} for n in ("a", "b", "c")}
    elapsed = time.perf_counter() - t0
    assert stages.threads == {"a": 1, "b": 1, "c": 1}  # each in a worker of one torch thread
    assert max(stages.timings.values()) <= stages.wall <= elapsed  # the group's wall time, once
    for n in ("a", "b", "c"):
        assert json.loads((tmp_path / n / "stage.json").read_text())["result"] == {"n": n}
    # a rerun keeps them: the function is not called again (it would fail now)
    again = Stages(total=3, say=lines.append)
    broken = [Stage(n, tmp_path / n, "", json.loads, ("not json",)) for n in ("a", "b", "c")]
    assert again.run_side_by_side(broken, processes=2) == {n: {"n": n} for n in ("a", "b", "c")}
    assert sum(line.endswith("- kept") for line in lines) == 3
    # one stage fails: its error is raised, the other's stage is kept for the next run
    mixed = [
        Stage("ok", tmp_path / "ok", "", json.loads, ("[1]",)),
        Stage("bad", tmp_path / "bad", "", json.loads, ("{",)),
    ]
    with pytest.raises(json.JSONDecodeError):
        Stages(total=2, say=lines.append).run_side_by_side(mixed, processes=2)
    assert (tmp_path / "ok" / "stage.json").is_file() and not (tmp_path / "bad" / "stage.json").exists()


def test_the_demo_with_side_by_side_processes_matches_the_demo_run_in_one(demo_run, tmp_path):
    out = tmp_path / "procs"
    assert run_demo(out, config=load_demo_config(CONFIG, smoke=True), processes=2, say=lambda _: None) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    before = json.loads((demo_run[0] / "metrics.json").read_text())
    side_by_side = {"captioner", "filter", "caption_web_2", "vqa_web", "caption_capfilt", "caption_capfilt_2"}
    assert {s for s, t in metrics["stage_threads"].items() if t == 1} == side_by_side | {"vqa_capfilt"}
    for folder in ("web/caption", "web/caption_2", "filter", "web/vqa", "capfilt/caption_2", "capfilt/vqa"):
        assert json.loads((out / folder / "config.json").read_text())["threads"] == 1, folder  # as they trained
    assert json.loads((out / "capfilt" / "pretrain" / "config.json").read_text())["threads"] == 2
    for arm in ("web", "capfilt"):
        for key in ("cider", "vqa_accuracy", "retrieval_r1"):
            assert metrics[arm][key] == pytest.approx(before[arm][key], abs=1e-6), (arm, key)


def test_every_pretraining_starts_its_vit_from_the_vision_stage(demo_run):
    out, _ = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["vision"]["accuracy"]) == {"kind", "color", "position"} and metrics["vision"]["steps"] == 2
    assert "the shape under each patch" in (out / "report.html").read_text()
    weights = out / "vision" / "vision.safetensors"
    for arm in ("web", "capfilt"):
        assert json.loads((out / arm / "pretrain" / "config.json").read_text())["vision_init"] == str(weights)


def test_the_filter_threshold_is_chosen_on_held_out_clean_images(demo_run):
    out, _ = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    chosen = metrics["filter"]["validation"]["chosen"]
    assert metrics["filter"]["threshold"] == chosen["threshold"]
    # the ITC weight: the config's candidate with the best validation AUC, and the one CapFilt scored with
    auc = metrics["filter"]["validation"]["auc_by_itc_weight"]
    assert [float(w) for w in auc] == list(load_demo_config(CONFIG, smoke=True).filter_itc_weights)
    assert metrics["filter"]["itc_weight"] == chosen["itc_weight"] == max(map(float, auc), key=lambda w: auc[str(w)])
    capfilt_options = json.loads((out / "capfilt_data" / "summary.json").read_text())["options"]
    assert capfilt_options.get("itc_weight", 0.0) == chosen["itc_weight"]
    assert capfilt_options["threshold"] == chosen["threshold"]
    for bad in ((), (0.0, -5.0)):
        with pytest.raises(ValueError, match="filter_itc_weights must be numbers >= 0"):
            load_demo_config(CONFIG, smoke=True).replace(filter_itc_weights=bad)
    train = [json.loads(line) for line in (out / "filter" / "filter_train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (out / "filter" / "filter_val.jsonl").read_text().splitlines()]
    assert len(train) == 16 - 4 and len(val) == 4  # smoke: 16 clean images, 4 held out
    assert not {r["image"] for r in train} & {r["image"] for r in val}
    assert all(r["negatives"] for r in train) and metrics["filter"]["validation"]["true_texts"] == 4 * 5
    # held out of pretraining too (both arms): images pretraining read scored higher than the web's
    held_out = {r["image"] for r in val}
    pretrained_on = {json.loads(line)["image"] for line in (out / "clean_pretrain.jsonl").read_text().splitlines()}
    bootstrapped = {
        json.loads(line)["image"] for line in (out / "capfilt_data" / "bootstrap.jsonl").read_text().splitlines()
    }
    assert pretrained_on == {r["image"] for r in train} and not held_out & bootstrapped
    web = metrics["filter"]["web"]
    partial = web["by_noise"].get("partial", {"texts": 0, "removed": 0})
    assert sum(v["texts"] for v in web["partial_by_attribute"].values()) == partial["texts"]
    assert sum(v["removed"] for v in web["partial_by_attribute"].values()) == partial["removed"]


def _added_negatives(demo_run, folder, **change):
    """Per clean training image: (its scene, its captions, its written negatives, the negatives `change` adds to
    them), after checking that the written negatives are drawn as before and the added ones are distinct."""
    from blip.data.shapes import Scene
    from blip.demo.stages import filter_manifests

    out, _ = demo_run
    cfg = load_demo_config(CONFIG, smoke=True).replace(position_negatives=0)  # the written negatives alone
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    plain = read(filter_manifests(cfg, out / "data", folder / "plain")[0])
    changed = read(filter_manifests(cfg.replace(**change), out / "data", folder / "changed")[0])
    scenes = {json.loads(line)["id"]: json.loads(line)["scene"] for line in (out / "data" / "clean.jsonl").open()}
    rows = []
    for a, b in zip(plain, changed, strict=True):
        written, negatives = a.get("negatives", []), b.get("negatives", [])
        assert negatives[: len(written)] == written
        extra = negatives[len(written) :]
        assert len(extra) == len(set(extra))
        rows.append((Scene.from_dict(scenes[b["id"]]), b["captions"], written, extra))
    return rows


def test_web_negatives_join_the_filters_written_negatives_false_for_their_image(demo_run, tmp_path):
    from blip.data.shapes import check_caption

    rows = _added_negatives(demo_run, tmp_path, web_negatives=4)
    web_texts = {json.loads(line)["caption"] for line in (demo_run[0] / "data" / "web.jsonl").open()}
    for scene, _, _, extra in rows:
        assert len(extra) <= 4 and set(extra) <= web_texts
        assert not any(check_caption(scene, t) for t in extra)
    assert sum(len(extra) for *_, extra in rows) >= 3 * len(rows)  # junk and unrelated abound: nearly all get 4
    with pytest.raises(ValueError, match="web_negatives"):
        load_demo_config(CONFIG, smoke=True).replace(web_negatives=-1)


def test_position_negatives_add_position_swaps_of_the_images_own_captions(demo_run, tmp_path):
    from blip.data.shapes import caption_errors

    rows = _added_negatives(demo_run, tmp_path, position_negatives=6)
    for scene, captions, written, extra in rows:
        assert not set(extra) & set(written)
        for text in extra:
            errors = caption_errors(scene, text)
            assert errors and all(" is at " in e for e in errors), (text, errors)  # false only in a shape's place
            assert any(len(set(text.split()) ^ set(c.split())) <= 6 for c in captions)  # one phrase swapped
    assert sum(len(extra) for *_, extra in rows) >= len(rows)  # half the captions state a place: most images get some
    with pytest.raises(ValueError, match="position_negatives"):
        load_demo_config(CONFIG, smoke=True).replace(position_negatives=-1)


def test_ablations_run_every_arm_on_its_own_data(tmp_path_factory):
    from blip.demo.ablations import ARMS, findings

    out = tmp_path_factory.mktemp("ablations")
    lines: list[str] = []
    assert run_demo(out, config=load_demo_config(CONFIG, smoke=True), ablations=True, say=lines.append) == 0
    assert any(line.startswith("[41/41] caption_round2_2: done") for line in lines)
    metrics = json.loads((out / "metrics.json").read_text())
    arms = metrics["ablations"]  # keyed by arm (the metrics.json contract)
    assert list(arms) == list(ARMS)
    for arm, numbers in arms.items():
        for key in ("cider", "bleu4", "vqa_accuracy", "retrieval_r1"):
            assert isinstance(numbers[key], float), (arm, key)
    assert arms["web"]["cider"] == metrics["web"]["cider"]  # the demo's arms are reused, not rerun
    assert metrics["demo_seconds"] == pytest.approx(sum(metrics["timings"][s] for s in STAGES))
    assert metrics["total_seconds"] > metrics["demo_seconds"]
    data = {arm: arms[arm]["data"]["by_origin"] for arm in ("captioner_only", "filter_only", "capfilt")}
    assert data["captioner_only"]["web"]["texts"] == 48 and data["captioner_only"]["synthetic"]["texts"] == 48
    assert data["filter_only"]["synthetic"]["texts"] == 0
    assert data["filter_only"]["web"] == data["capfilt"]["web"]
    assert all(d["clean"]["texts"] == (16 - 4) * 5 for d in data.values())  # validation images held out
    # the beam arm captioned by beam search (tests/capfilt/test_run.py: those are the captioner's beams); the shared
    # arm used one model for both roles; round 2 started from the CapFilt model
    beam = json.loads((out / "ablations" / "beam" / "capfilt_data" / "summary.json").read_text())["options"]
    assert beam["num_beams"] == 3
    shared = json.loads((out / "ablations" / "shared" / "capfilt_data" / "summary.json").read_text())["models"]
    assert shared.count("shared/model/checkpoint.pt") == 2
    round2 = json.loads((out / "ablations" / "round2" / "captioner" / "config.json").read_text())
    assert round2["init"].endswith("capfilt/pretrain/checkpoint.pt")
    assert set(metrics["ablation_findings"]) == {"effect", "diversity", "sharing", "rounds"}
    assert metrics["ablation_findings"] == findings(arms)
    assert "Ablations" in (out / "report.html").read_text()


def test_findings_follow_the_numbers():
    from blip.demo.ablations import ARMS, findings

    arms = {arm: {"cider": 1.0, "vqa_accuracy": 1.0, "retrieval_r1": 1.0} for arm in ARMS}
    arms["capfilt"] = {"cider": 3.0, "vqa_accuracy": 3.0, "retrieval_r1": 3.0}
    arms["web"] = {"cider": 0.0, "vqa_accuracy": 0.0, "retrieval_r1": 0.0}
    arms["capfilt"]["capfilt"] = {"synthetic_true_rate": 0.2, "false_synthetic_accepted": 0.1}
    arms["beam"]["capfilt"] = {"synthetic_true_rate": 0.3}
    arms["shared"]["capfilt"] = {"false_synthetic_accepted": 0.5}
    found = findings(arms)
    assert found["effect"]["holds"] and found["diversity"]["holds"] and found["sharing"]["holds"]
    assert not found["rounds"]["holds"]  # round 2 (1.0) below round 1 (3.0)
    arms["beam"]["cider"] = 5.0
    assert findings(arms)["diversity"]["comparisons"]["capfilt (nucleus) > beam"]["cider"] is False


def test_several_seeds_tabulate_their_spread_and_the_claims(demo_run, tmp_path, monkeypatch, capsys):
    import blip.demo.seeds as seeds
    from blip.cli import main
    from blip.demo.ablations import ARMS, findings

    base = json.loads((demo_run[0] / "metrics.json").read_text())
    calls = []

    def fake_run_demo(folder, *, seed, ablations, **_):  # a real run's metrics.json, with numbers set per seed
        m = json.loads(json.dumps(base))
        m["web"]["cider"], m["capfilt"]["cider"] = 10.0, 10.0 + seed  # seed 0: a tie, not a win
        arms = {arm: {"cider": 5.0, "vqa_accuracy": 1.0, "retrieval_r1": 1.0} for arm in ARMS}
        arms["capfilt"]["data"] = {"false_rate": 0.1 * seed}
        arms["round2"]["cider"] = 4.0 + seed  # above round 1 (5.0) on seed 2 only
        m["ablations"], m["ablation_findings"] = arms, findings(arms)
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(m))
        calls.append((folder.name, seed, ablations))
        return 0

    monkeypatch.setattr(seeds, "run_demo", fake_run_demo)
    out = tmp_path / "seeds"
    assert main(["demo", "--seeds", "0", "1", "2", "--ablations", "--out", str(out)]) == 0
    assert calls == [("seed0", 0, True), ("seed1", 1, True), ("seed2", 2, True)]
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["per_seed"]["2"]["capfilt.cider"] == 12.0
    assert summary["spread"]["capfilt.cider"] == {"mean": 11.0, "std": 1.0, "min": 10.0, "max": 12.0}
    assert summary["deltas"]["cider"] == [0.0, 1.0, 2.0] and summary["capfilt_wins"]["cider"] == 2
    ablations = summary["ablations"]
    assert ablations["arms"]["capfilt"]["data.false_rate"] == pytest.approx([0.0, 10.0, 20.0])  # in %
    assert ablations["comparisons"]["rounds"]["round2 > capfilt"]["cider"] == 1 and ablations["held"]["rounds"] == 0
    table = (out / "seeds.md").read_text()
    assert "| CIDEr, CapFilt | 10.0 | 11.0 | 12.0 | 11.0 ± 1.0 |" in table
    assert "| cider: CapFilt − web | +0.0 | +1.0 | +2.0 | +1.0 ± 1.0 |" in table
    assert "- round2 > capfilt: cider 1/3 (+0.0 ± 1.0)" in table  # round 2 − round 1: −1, 0, +1
    assert ablations["deltas"]["rounds"]["round2 > capfilt"]["cider"] == [-1.0, 0.0, 1.0]
    report = (out / "report.html").read_text()
    assert "seed2/report.html" in report and "Holds on 0/3 seeds" in report
    assert "report_seeds.png" in report and (out / "report_seeds.png").stat().st_size > 0
    capsys.readouterr()
    # a folder holding one seed's run is not overwritten by a seeds report; --seed and --seeds do not mix
    assert main(["demo", "--seeds", "0", "--out", str(demo_run[0])]) == 2
    assert "holds a single-seed demo run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--seed", "1", "--seeds", "0", "1"])
    assert main(["demo", "--seeds", "0", "0", "--out", str(tmp_path / "twice")]) == 2
    assert "distinct" in capsys.readouterr().err


def test_training_stages_label_their_progress_bars(demo_run):
    out, _ = demo_run
    for folder, label in (("web/pretrain", "demo 4/13 pretrain_web"), ("capfilt/vqa", "demo 11/13 vqa_capfilt")):
        assert json.loads((out / folder / "config.json").read_text())["label"] == label


def test_demo_rerun_keeps_finished_stages(demo_run):
    out, _ = demo_run
    lines: list[str] = []
    assert run_demo(out, config=load_demo_config(CONFIG, smoke=True), say=lines.append) == 0
    kept = [line for line in lines if line.endswith("- kept")]
    assert len(kept) == len(STAGES)


def test_demo_refuses_a_folder_of_another_config(demo_run):
    out, _ = demo_run
    with pytest.raises(DemoConfigError, match="another config"):
        run_demo(out, config=load_demo_config(CONFIG, smoke=True), seed=7, say=lambda _: None)


def test_a_run_saved_before_a_config_field_existed_resumes_with_its_default(demo_run, tmp_path):
    import shutil

    out = tmp_path / "older"
    shutil.copytree(demo_run[0], out)
    saved = json.loads((out / "demo_config.json").read_text())
    del saved["web_negatives"], saved["filter"]["warmup_lr"]  # as a run from before they existed (defaults here)
    (out / "demo_config.json").write_text(json.dumps(saved))
    lines: list[str] = []
    assert run_demo(out, config=load_demo_config(CONFIG, smoke=True), say=lines.append) == 0
    assert all("done earlier" in line for line in lines if line.startswith("[")), lines
    saved["filter"]["written_negatives"] = 5  # a value that differs is still another config
    (out / "demo_config.json").write_text(json.dumps(saved))
    with pytest.raises(DemoConfigError, match="another config"):
        run_demo(out, config=load_demo_config(CONFIG, smoke=True), say=lambda _: None)


def test_the_full_demo_config_loads_and_is_bigger_than_the_smoke_one():
    full, smoke = load_demo_config(CONFIG), load_demo_config(CONFIG, smoke=True)
    assert full.n_web > smoke.n_web and full.pretrain.max_steps > smoke.pretrain.max_steps
    assert sum(full.noise_rates) == pytest.approx(1.0)


# A pretraining stage long enough to be killed in the middle: 64 web + 80 clean pairs in batches of 2 are one
# 72-step epoch, so the only checkpoints before its end are the timed ones (every 0.15 s).
KILL_CONFIG = f"""
import importlib.util

spec = importlib.util.spec_from_file_location("demo_shapes", {str(CONFIG)!r})
demo_shapes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_shapes)


def get_config(smoke=False):
    cfg = demo_shapes.get_config(smoke=True)
    pretrain = cfg.pretrain.replace(batch_size=2, max_steps=72, log_every=1, ckpt_every_s=0.15)
    return cfg.replace(n_web=64, pretrain=pretrain, untrained_baseline=False)
"""


def test_kill_9_in_a_demo_stage_then_rerun_resumes_from_a_recent_checkpoint(tmp_path, caplog):
    config = tmp_path / "demo_kill.py"
    config.write_text(KILL_CONFIG)
    out = tmp_path / "demo"
    stage = out / "web" / "pretrain"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blip.cli", "demo", "--config", str(config), "--out", str(out), "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def logged_steps() -> list[int]:
        path = stage / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [json.loads(line)["step"] for line in lines if line.endswith("}")]

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = logged_steps()
        if (
            (stage / "checkpoint.pt").is_file()
            and steps
            and steps[-1] > load_checkpoint(stage / "checkpoint.pt")["step"]
        ):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the demo left its pretraining stage before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = max(logged_steps())
    checkpoint = load_checkpoint(stage / "checkpoint.pt")
    assert checkpoint["epoch"] == 0 and 1 <= checkpoint["step"] < 72  # a timed checkpoint, inside the epoch
    assert not (stage / "stage.json").exists()

    # The rerun of the stage (what `blip demo` does next time) resumes from that checkpoint and ends exactly where an
    # uninterrupted run of the same stage ends.
    cfg = load_demo_config(config).replace(threads=1)
    cfg = cfg.replace(pretrain=cfg.pretrain.replace(vision_init=str(out / "vision" / "vision.safetensors")))  # as _run
    data_dir = out / "data"
    web_data = f"{data_dir / 'web.jsonl'},{pretraining_clean(cfg, data_dir)}"  # as _run
    with caplog.at_level(logging.INFO, logger="blip.train.loop"):
        resumed = pretrain(cfg, web_data, stage, data_dir)
    reference = pretrain(cfg, web_data, tmp_path / "reference", data_dir)
    assert f"resumed from {stage / 'checkpoint.pt'} at step {checkpoint['step']}" in caplog.text
    assert checkpoint["step"] <= done_at_kill
    assert resumed["steps"] == reference["steps"] == 72
    a, b = load_checkpoint(resumed["checkpoint"]), load_checkpoint(reference["checkpoint"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert resumed["test"] == reference["test"]
