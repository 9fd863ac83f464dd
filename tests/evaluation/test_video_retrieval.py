"""Zero-shot text-to-video retrieval on shapes-world clips (`blip.evaluation.video`, `blip eval --task
video_retrieval`): the ranks and recalls are computed as defined (ties, shared captions, chance), the whole protocol
runs end to end on a tiny model, and a model pretrained on shapes *images* only retrieves clips well above chance
(slow: it trains one first)."""

from __future__ import annotations

import json

import pytest
import torch

import blip
from blip.data.shapes.video import generate_videos
from blip.evaluation.video import _ranks, evaluate_video_retrieval, read_clips
from oracle import TinySpec

TINY = TinySpec(kind="retrieval", seed=97)


def test_ranks_ties_and_shared_captions():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.7, 0.2], [0.3, 0.3, 0.3]])
    # row 0: column 0 is last; row 1: column 1 ties column 0 and comes after it; row 2: best of columns 1 and 2
    assert _ranks(scores, [[0], [1], [1, 2]]).tolist() == [2, 1, 1]


def test_protocol_end_to_end_on_a_tiny_model(hf_checkpoints, tmp_path, capsys):
    from blip.cli import main

    generate_videos(tmp_path, 12, seed=1)
    model = blip.load(hf_checkpoints(TINY))
    result = evaluate_video_retrieval(model, read_clips(tmp_path), num_frames=4, k_test=5)
    m = result.metrics
    assert (m["clips"], m["num_frames"]) == (12, 4)
    assert [m["chance_r1"], m["chance_r5"], m["chance_r10"]] == pytest.approx([100 / 12, 500 / 12, 1000 / 12])
    for prefix in ("t2v_", "itc_t2v_"):
        assert 0 <= m[f"{prefix}r1"] <= m[f"{prefix}r5"] <= m[f"{prefix}r10"] <= 100 and 1 <= m[f"{prefix}medr"] <= 12
    assert len(result.predictions) == m["captions"] and all(1 <= p["rank"] <= 12 for p in result.predictions)
    # ITC ranks agree with embed_videos / embed_texts; a caption two clips share (seed 1 has one) finds either
    rows = read_clips(tmp_path)
    captions = sorted({r["caption"] for r in rows})
    assert m["captions"] == len(captions) < len(rows)
    sims = model.embed_texts(captions) @ model.embed_videos([r["video"] for r in rows], num_frames=4).T
    best = sims.argmax(1).tolist()
    itc_r1 = 100.0 * sum(rows[j]["caption"] == c for c, j in zip(captions, best)) / len(captions)
    assert m["itc_t2v_r1"] == pytest.approx(itc_r1)

    out = tmp_path / "eval"
    argv = ["eval", "-m", str(hf_checkpoints(TINY)), "--task", "video_retrieval", "--data", str(tmp_path)]
    assert main([*argv, "--frames", "4", "--k-test", "5", "--out", str(out), "--no-plots"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"] == pytest.approx(m)
    assert json.loads((out / "eval_video_retrieval.json").read_text()) == pytest.approx(m)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_shapes_pretrained_model_retrieves_clips_zero_shot(tmp_path, record_property):
    """A retrieval model trained on shapes images (600 clean images, 800 steps, ~1.5 min on a core) never saw a
    video; on 60 clips of moving, recolouring and appearing shapes it finds each caption's clip well above chance."""
    from blip.data import shapes
    from blip.train.config import SHAPES_MODEL, TrainConfig
    from blip.train.recipe import run

    world = tmp_path / "world"
    shapes.generate(world, seed=5, n_clean=600, n_web=0, n_vqa=8, n_test=8, progress=False)
    cfg = TrainConfig(
        task="retrieval",
        data=str(world),
        out_dir=str(tmp_path / "model"),
        eval_data=str(world),
        epochs=1,
        max_steps=800,
        batch_size=16,
        lr=1e-3,
        warmup_steps=20,
        queue_size=256,
        alpha_ramp_epochs=1.0,
        threads=1,
        log_every=200,
        eval_max_images=8,
        **{**SHAPES_MODEL, "patch_size": 16},
    )
    assert run(cfg).finished
    model = blip.load(tmp_path / "model" / "model")
    generate_videos(tmp_path / "clips", 60, seed=1)
    m = evaluate_video_retrieval(model, read_clips(tmp_path / "clips"), num_frames=8, k_test=16).metrics
    for key, value in m.items():
        record_property(key, value)
    print(json.dumps(m))
    assert m["itc_t2v_r1"] >= 4 * m["chance_r1"]
    assert m["itc_t2v_r5"] >= 3 * m["chance_r5"]
    assert m["itc_t2v_r10"] >= 2.5 * m["chance_r10"]
    assert m["t2v_r10"] >= 2 * m["chance_r10"]  # ITM over the concatenated frames, on top
