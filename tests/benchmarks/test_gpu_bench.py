"""`make bench-gpu` (benchmarks/gpu.py) in its `--smoke` form on the CPU, so that the one GPU benchmark command cannot
rot: its rows run on tiny models, the static and eager decoding paths agree, the other benchmark scripts' command lines
are checked against their own flags, a missing package is reported as skipped with its name, and the JSON is
written. No speed is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402

SCRIPT_ROWS = ("batch_caption_2048", "serve_load", "train_pretrain_224", "train_caption_384", "blip2_gpu")


def _run(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "gpu.json"
    record = gpu.main(["--smoke", "--out", str(out), "--cache", str(tmp_path / "cache"), *flags])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record, default=str))
    return record


def test_smoke_without_transformers(tmp_path, capsys):
    rows = _run(tmp_path, "--no-transformers")["rows"]
    for key in ("matmul_bf16", "vision_b128_bf16", "caption_greedy_b3", "caption_b1_e2e"):
        assert rows[key]["status"] == "ok", rows[key]
    caption = rows["caption_greedy_b3"]
    assert caption["static_equals_eager"] == caption["of"] == 3
    assert caption["transformers"] == "skipped: --no-transformers" and "ratio" not in caption
    assert rows["vision_b128_bf16"]["tflops"] > 0 and rows["caption_b1_e2e"]["static_ms"] > 0
    for key in SCRIPT_ROWS:  # their flags exist in the scripts; not run in the smoke form
        assert rows[key]["status"] == "skipped", rows[key]
        assert rows[key]["reason"].startswith(("--smoke: command line checked", "needs ")), rows[key]
    table = capsys.readouterr().out
    assert "| row | status | measured | target | met |" in table and "caption greedy, batch 3" in table


def test_smoke_against_transformers(tmp_path):
    pytest.importorskip("transformers")
    rows = _run(tmp_path, "--skip", "vision_b128_bf16")["rows"]
    caption = rows["caption_greedy_b3"]
    assert caption["same_tokens_as_transformers"] == caption["static_equals_eager"] == 3
    assert caption["ratio"] > 0 and isinstance(caption["met"], bool)
    assert rows["vision_b128_bf16"] == dict(label="vision_b128_bf16", status="skipped", reason="--skip")


def test_script_rows_report_missing_packages_and_unknown_flags(tmp_path, monkeypatch):
    args = gpu.main.__globals__["argparse"].Namespace(smoke=True, budget_s=1.0, device="cpu")
    row = gpu.ScriptRow("x", "serving", "serve_load.py", ["--models", "base"], "x.json", ("no_such_package_x",), dict)
    assert gpu.run_script(row, args, tmp_path, 100) == dict(
        label="serving", status="skipped", reason="needs no_such_package_x (not installed)"
    )
    bad = gpu.ScriptRow("x", "serving", "serve_load.py", ["--no-such-flag", "1"], "x.json", (), dict)
    assert gpu.run_script(bad, args, tmp_path, 100)["reason"] == "serve_load.py has no flag --no-such-flag"
    args.smoke = False
    late = gpu.ScriptRow("x", "training", "bench_train.py", ["--steps", "1"], "x.json", (), dict)
    assert gpu.run_script(late, args, tmp_path, 5)["reason"] == "time budget (1s) spent"
    monkeypatch.setattr(gpu, "MIN_ROW_SECONDS", 0)  # started with 1.5 s left: killed (its process group) at the limit
    slow = gpu.ScriptRow("x", "training", "bench_train.py", ["--steps", "100000"], "x.json", (), dict)
    assert gpu.run_script(slow, args, tmp_path, 1.5)["reason"] == "timed out after 2s (the time budget)"
