"""NLVR2 fine-tuning on the shapes-world pairs: the recipe end to end (smoke, from a tiny BLIP via `init=`), and,
marked slow, learning from a shapes-pretrained model well above the majority class."""

from __future__ import annotations

import json

import pytest

import blip
from blip.config import get_preset
from blip.data.vocab import config_for, shapes_tokenizer
from blip.train.config import TrainConfig
from blip.train.recipe import run

TINY = dict(
    augment=False,
    hflip=False,
    randaugment=False,
    threads=1,
    log_every=2,
    warmup_steps=1,
)


def test_nlvr_recipe_smoke(tmp_path):
    tokenizer = shapes_tokenizer()
    config = config_for(tokenizer, get_preset("blip_test").replace(kind="retrieval"))
    blip.create_model(config, tokenizer, seed=1).save(tmp_path / "retrieval")
    cfg = TrainConfig(
        task="nlvr",
        data=str(tmp_path / "pairs"),
        make_shapes=True,
        nlvr_counts=(32, 12),
        eval_data=str(tmp_path / "pairs"),
        init=str(tmp_path / "retrieval"),
        out_dir=str(tmp_path / "run"),
        batch_size=8,
        max_steps=4,
        **TINY,
    )
    summary = run(cfg)
    assert summary.finished and summary.step == 4
    metrics = summary.evaluation["nlvr"]
    assert metrics["pairs"] == 12 and 0 <= metrics["accuracy"] <= 100 and metrics["majority_baseline"] >= 50
    saved = tmp_path / "run" / "model"
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["BlipForVisualReasoning"]
    for source in (saved, tmp_path / "run" / "checkpoint.pt"):
        model = blip.load(source)
        pair = json.loads((tmp_path / "pairs" / "nlvr_test.jsonl").read_text().splitlines()[0])
        verdict = model.reason(
            tmp_path / "pairs" / pair["image_a"], tmp_path / "pairs" / pair["image_b"], pair["statement"]
        )
        assert 0.0 <= verdict[0].score <= 1.0
    predictions = (tmp_path / "run" / "eval_nlvr_predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 12


@pytest.mark.slow
def test_nlvr_learns_on_the_shapes_world(tmp_path):
    """A tiny BLIP pretrained on the shapes world (ITC + ITM + LM), then fine-tuned on the NLVR pairs."""
    from blip.data import shapes

    world = tmp_path / "world"
    shapes.generate(world, seed=0, n_clean=300, n_web=3000, n_vqa=0, n_test=20, progress=False)
    sizes = dict(
        image_size=64,
        patch_size=16,
        vision_width=128,
        vision_layers=3,
        vision_heads=4,
        text_width=128,
        text_layers=2,
        text_heads=4,
        embed_dim=64,
        init_std=0.1,
    )
    pretrain = TrainConfig(
        task="pretrain",
        data=str(world),
        data_split="web,clean",
        out_dir=str(tmp_path / "pretrain"),
        queue_size=512,
        alpha_ramp_epochs=1.0,
        epochs=3,
        batch_size=32,
        lr=5e-4,
        min_lr=1e-5,
        warmup_steps=50,
        save_hf=False,
        **sizes,
        **{**TINY, "log_every": 50},
    )
    assert run(pretrain).finished
    cfg = TrainConfig(
        task="nlvr",
        data=str(tmp_path / "pairs"),
        make_shapes=True,
        nlvr_counts=NLVR_COUNTS,
        eval_data=str(tmp_path / "pairs"),
        init=str(tmp_path / "pretrain" / "checkpoint.pt"),
        out_dir=str(tmp_path / "nlvr"),
        epochs=NLVR_EPOCHS,
        batch_size=32,
        lr=3e-4,
        save_hf=False,
        **{**TINY, "log_every": 50, "warmup_steps": 50},
    )
    metrics = run(cfg).evaluation["nlvr"]
    print(json.dumps(metrics))
    assert metrics["accuracy"] > metrics["majority_baseline"] + NLVR_MARGIN, metrics


NLVR_COUNTS = (10000, 400)
NLVR_EPOCHS = 6
NLVR_MARGIN = 10.0
