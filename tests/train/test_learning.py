"""Learning is real: tiny models trained from scratch for seconds beat the same models untrained on the test split.

The longer run (pretraining, then fine-tuning; minutes) is `python -m blip.train.pipeline`; see its report.
"""

from __future__ import annotations

import pytest

from blip.train.config import TrainConfig
from blip.train.pipeline import blind_vqa_baseline, evaluate_untrained
from blip.train.recipe import run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from blip.data import shapes

    out = tmp_path_factory.mktemp("shapes_learning")
    shapes.generate(out, seed=1, n_clean=300, n_web=0, n_vqa=300, n_test=40, progress=False)
    return out


def _config(task: str, world, out, **changes) -> TrainConfig:
    base = TrainConfig(
        task=task,
        data=str(world),
        out_dir=str(out),
        eval_data=str(world),
        epochs=3,
        batch_size=16,
        lr=1e-3,
        warmup_steps=20,
        init_std=0.1,
        queue_size=256,
        alpha_ramp_epochs=1.0,
        augment=False,
        threads=1,
        log_every=20,
        save_hf=False,
        eval_num_beams=1,
        eval_min_new_tokens=0,
    )
    return base.replace(**changes)


def test_caption_vqa_retrieval_learn(world, tmp_path):
    results = {}
    for task in ("caption", "vqa", "retrieval"):
        cfg = _config(task, world, tmp_path / task)
        before = evaluate_untrained(cfg, task)
        summary = run(cfg)
        assert summary.finished
        results[task] = (before, summary.evaluation[task])
    before, after = results["caption"]
    assert after["cider"] > 0.3 and after["cider"] > 4 * before["cider"], results["caption"]
    assert after["bleu4"] > 0.15 > before["bleu4"]
    before, after = results["vqa"]
    assert after["accuracy"] > 40.0 > before["accuracy"] + 30, results["vqa"]
    assert after["accuracy_yes/no"] > 60.0  # the answer vocabulary and the question types are learned
    assert after["accuracy"] > blind_vqa_baseline(str(world)) - 5
    before, after = results["retrieval"]
    assert after["r_mean"] > before["r_mean"] + 8, results["retrieval"]
    assert after["tr_r5"] > 2 * 100 * 5 / 40  # twice chance
