"""`blip demo` end to end at toy size: every stage runs, metrics.json has the demo's numbers, the report is written,
and a rerun keeps the finished stages. (The full-size demo is `make demo`, outside the suite.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip.demo import DemoConfigError, load_demo_config, run_demo

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_shapes.py"
STAGES = (
    "data",
    "baselines",
    "pretrain_web",
    "captioner",
    "filter",
    "capfilt",
    "pretrain_capfilt",
    "caption_capfilt",
    "vqa_web",
    "vqa_capfilt",
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
    assert set(metrics["timings"]) == set(STAGES)
    assert metrics["baselines"]["chance"]["retrieval_r1"] == pytest.approx(100 / 8)
    sets = metrics["training_sets"]
    assert sets["web"]["web"] == 48 and sets["web"]["clean"] == sets["capfilt"]["clean"] == 16 * 5
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
    assert any(line.startswith("[10/10] vqa_capfilt: done") for line in lines)
    assert any("filter on web captions: precision" in line for line in lines)


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


def test_the_full_demo_config_loads_and_is_bigger_than_the_smoke_one():
    full, smoke = load_demo_config(CONFIG), load_demo_config(CONFIG, smoke=True)
    assert full.n_web > smoke.n_web and full.pretrain.max_steps > smoke.pretrain.max_steps
    assert sum(full.noise_rates) == pytest.approx(1.0)
