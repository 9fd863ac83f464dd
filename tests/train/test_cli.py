"""`blip train` / `blip eval` end to end through the real entry points, on the smoke configs and a tiny world."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from train_helpers import REPO

import blip
from blip.train.cli import cli_main, eval_main
from blip.weights.checkpoint import load_checkpoint

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _train(capsys, config: str, shapes_dir, out, *extra: str) -> dict:
    code = cli_main(
        [
            "--config",
            str(REPO / "configs" / config),
            "smoke=true",
            f"data={shapes_dir}",
            f"eval_data={shapes_dir}",
            f"out_dir={out}",
            "threads=1",
            *extra,
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out)


def test_caption_train_then_eval(capsys, shapes_dir, tmp_path):
    summary = _train(capsys, "caption_shapes.py", shapes_dir, tmp_path / "run", "save_hf=true")
    assert summary["finished"] and summary["step"] == 6 and set(summary["evaluation"]) == {"caption"}
    run_dir = tmp_path / "run"
    for name in ("checkpoint.pt", "metrics.jsonl", "config.json", "summary.json", "eval_caption.json"):
        assert (run_dir / name).is_file(), name
    if HAVE_MATPLOTLIB:  # plots are skipped (with a warning) without it
        assert (run_dir / "loss.png").is_file() and (run_dir / "eval_caption_examples.png").is_file()
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["task"] == "caption" and ckpt["train_config"]["smoke"] and ckpt["model_config"]["kind"] == "caption"

    # The exported model is a Hugging Face folder that blip.load reads and that captions like the trained weights.
    model = blip.load(run_dir / "model")
    assert model.config.kind == "caption"
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    image = str(shapes_dir / "images" / "test" / "000000.png")
    assert model.caption(image, prompt="a picture of")[0].text.startswith("a picture of")

    # The training checkpoint itself is self-describing: blip.load reads config and tokenizer from inside it.
    from_ckpt = blip.load(run_dir / "checkpoint.pt")
    assert from_ckpt.report.layout == "blip-train-checkpoint" and from_ckpt.config == model.config
    assert from_ckpt.caption(image)[0].token_ids == model.caption(image)[0].token_ids
    resized = blip.load(run_dir / "checkpoint.pt", kind="caption", image_size=2 * model.config.vision.image_size)
    assert resized.config.vision.image_size == 2 * model.config.vision.image_size

    args = ["--model", str(run_dir / "model"), "--task", "caption", "--data", str(shapes_dir)]
    settings = ["--num-beams", "1", "--min-new-tokens", "0", "--max-images", "8"]  # the smoke config's evaluation
    code = eval_main([*args, *settings, "--out", str(tmp_path / "e")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert set(result["metrics"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"}
    assert result["metrics"] == pytest.approx(summary["evaluation"]["caption"])  # the run's prompt by default
    assert (tmp_path / "e" / "eval_caption.png").is_file() or not HAVE_MATPLOTLIB
    assert len((tmp_path / "e" / "eval_caption_predictions.jsonl").read_text().splitlines()) == 8


def test_transformers_loads_the_exported_model(capsys, shapes_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    _train(capsys, "vqa_shapes.py", shapes_dir, tmp_path / "run", "save_hf=true", "eval_data=")
    folder = tmp_path / "run" / "model"
    hf = transformers.BlipForQuestionAnswering.from_pretrained(folder)
    ours = blip.load(folder)
    hf_state = hf.state_dict()
    for key, value in ours.model.state_dict().items():
        if key in hf_state:
            assert torch.equal(hf_state[key], value), key
    image = str(shapes_dir / "images" / "test" / "000000.png")
    processor = transformers.BlipProcessor.from_pretrained(folder)
    inputs = processor(
        images=blip.transforms.load_image(image), text="what color is the background?", return_tensors="pt"
    )
    generated = hf.generate(**inputs, max_new_tokens=5)[0].tolist()
    assert ours.answer(image, "what color is the background?", max_new_tokens=5)[0].token_ids == generated


def test_pretrain_checkpoint_evaluates_on_retrieval_and_vqa_parts(capsys, shapes_dir, tmp_path):
    summary = _train(capsys, "pretrain_shapes.py", shapes_dir, tmp_path / "run")
    assert set(summary["evaluation"]) == {"retrieval", "caption"}  # zero-shot retrieval, unprompted captions
    assert set(summary["losses"]) >= {"itc_loss", "itm_loss", "lm_loss", "loss"}
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    code = eval_main(["--model", ckpt, "--task", "retrieval", "--data", str(shapes_dir), "--no-plots"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and {"tr_r1", "ir_r1", "r_mean"} <= set(result["metrics"])
    code = eval_main(["--model", ckpt, "--task", "vqa", "--data", str(shapes_dir), "--max-images", "3"])
    assert code == 0 and "accuracy" in json.loads(capsys.readouterr().out)["metrics"]
    # fine-tune from it, through the same entry point
    summary = _train(capsys, "retrieval_shapes.py", shapes_dir, tmp_path / "ft", f"init={ckpt}", "eval_data=")
    assert summary["finished"]


def test_usage_errors_exit_2(capsys, tmp_path):
    assert cli_main(["task=caption", "data=x", "lrr=1"]) == 2
    assert "unknown config key 'lrr'" in capsys.readouterr().err
    assert cli_main(["task=caption", "data=x", "batch_size=many"]) == 2
    assert "expected an integer" in capsys.readouterr().err
    assert cli_main(["task=caption"]) == 2
    assert "no training data" in capsys.readouterr().err
    assert cli_main(["task=caption", f"data={tmp_path / 'missing'}", f"out_dir={tmp_path / 'o'}"]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli_main(["--config", str(REPO / "configs" / "vqa_shapes.py"), "--print-config", "lr=1e-3"]) == 0
    assert json.loads(capsys.readouterr().out)["lr"] == 1e-3
    assert eval_main(["--model", str(tmp_path / "nope"), "--task", "caption", "--data", str(tmp_path)]) == 2


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "blip.train.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "key=value" in result.stdout
