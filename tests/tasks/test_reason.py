"""NLVR2 end to end on a tiny original-layout model: `blip reason`, `POST /v1/reason`, `blip batch reason`."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import httpx
import pytest

import blip
from blip.cli import main as cli_main
from blip.jobs.cli import batch_main
from nlvr_helpers import write_nlvr_checkpoint
from oracle import make_images

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))


@pytest.fixture(scope="module")
def nlvr(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nlvr")
    path, tokenizer, _ = write_nlvr_checkpoint(folder / "model", seed=7)
    model = blip.load(path, tokenizer=tokenizer)
    model.save(folder / "saved")  # a self-contained folder (weights, config, tokenizer) for the CLI and the jobs
    images = folder / "images"
    images.mkdir()
    for i, image in enumerate(make_images(3, seed=4)):
        image.save(images / f"img{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    return model, folder / "saved", images


def _expected(model, images, a, b, statement):
    from PIL import Image

    return model.reason(Image.open(images / a), Image.open(images / b), statement)[0]


def test_cli_text_and_jsonl(nlvr, capsys):
    model, saved, images = nlvr
    a, b = str(images / "img0.png"), str(images / "img1.png")
    argv = ["reason", "-m", str(saved), "--image-a", a, "--image-a", b, "--image-b", b, "--statement", "a red star"]
    assert cli_main([*argv, "--format", "jsonl", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["image_a"], r["image_b"], r["statement"]) for r in rows] == [(a, b, "a red star"), (b, b, "a red star")]
    want = _expected(model, images, "img0.png", "img1.png", "a red star")
    assert abs(rows[0]["score"] - want.score) < 1e-5 and rows[0]["label"] == want.label

    assert cli_main(["reason", "-m", str(saved), "--image-a", a, "--image-b", b, "--statement", "a red star"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"{a}\t{b}\ta red star\t{str(want.label).lower()}\t{want.score:.4f}"


def test_cli_bad_image_fails_its_row_and_mismatched_flags_are_usage_errors(nlvr, capsys):
    _, saved, images = nlvr
    a, bad = str(images / "img0.png"), str(images / "broken.png")
    argv = ["reason", "-m", str(saved), "--image-a", a, "--image-a", a, "--image-b", a, "--image-b", bad]
    assert cli_main([*argv, "--statement", "two shapes", "--format", "jsonl"]) == 1
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert len([r for r in rows if "score" in r]) == 1 and rows[-1]["image"] == bad and "error" in rows[-1]
    argv = ["reason", "-m", str(saved), "--image-a", a, "--image-a", a, "--image-b", a, "--image-b", a, "--image-b", a]
    assert cli_main([*argv, "--statement", "x"]) == 2
    assert "--image-a" in capsys.readouterr().err


def test_http_reason(nlvr):
    from serve_helpers import LiveServer

    from blip.serve.app import create_app
    from blip.serve.settings import ServeSettings

    model, _, images = nlvr

    def ref(name: str) -> dict:
        return {"b64": base64.b64encode((images / name).read_bytes()).decode()}

    app = create_app({"nlvr": model}, ServeSettings(max_wait_ms=5.0))
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30, trust_env=False) as client:
        body = {
            "image_a": [ref("img0.png"), ref("img2.png")],
            "image_b": [ref("img1.png")],
            "statements": ["a red star", "two shapes"],
        }
        response = client.post("/v1/reason", json=body)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        for result, (a, statement) in zip(results, [("img0.png", "a red star"), ("img2.png", "two shapes")]):
            want = _expected(model, images, a, "img1.png", statement)
            assert abs(result["score"] - want.score) < 1e-5 and result["label"] == want.label
        bad = client.post("/v1/reason", json={**body, "statements": ["a", "b", "c"]})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "image_a"
        broken = client.post("/v1/reason", json={**body, "image_b": [{"b64": base64.b64encode(b"nope").decode()}]})
        assert broken.status_code == 422 and "image_b[0]" in broken.json()["error"]["message"]
        empty = client.post("/v1/reason", json={**body, "statements": [" "]})
        assert empty.status_code == 422
        wrong = client.post("/v1/match", json={"images": [ref("img0.png")], "texts": ["x"]})
        assert wrong.status_code == 422 and wrong.json()["error"]["code"] == "wrong_task"


def test_batch_reason_resumable_with_bad_rows(nlvr, tmp_path):
    model, saved, images = nlvr
    manifest = tmp_path / "pairs.csv"
    lines = [
        "image_a,image_b,statement",
        f"{images / 'img0.png'},{images / 'img1.png'},a red star",
        "img1.png,img2.png,two shapes",
        "img2.png,broken.png,a circle",
        "img0.png,,a circle",
        "img0.png,img0.png,",
    ]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["reason", "-m", str(saved), "-i", str(manifest), "-o", str(out), "--root", str(images)]
    argv += ["--device", "cpu", "--workers", "1", "--no-progress", "--shard-size", "2", "--batch-size", "2"]
    assert batch_main(argv) == 1  # some rows failed
    rows = [json.loads(line) for path in sorted(out.glob("part-*.jsonl")) for line in path.read_text().splitlines()]
    assert [r["statement"] for r in rows] == ["a red star", "two shapes"]
    want = _expected(model, images, "img1.png", "img2.png", "two shapes")
    assert abs(rows[1]["score"] - want.score) < 1e-5 and rows[1]["label"] == want.label
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    reasons = sorted(e["error"] for e in errors)
    assert len(reasons) == 3
    assert any(r.startswith("image_b:") for r in reasons)
    assert "no image_b" in reasons and "no statement" in reasons
    # a rerun of the same job resumes: nothing is redone
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.jsonl")}
    assert batch_main(argv) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.jsonl")} == before


def test_batch_reason_needs_a_pair_manifest(nlvr, tmp_path, capsys):
    _, saved, images = nlvr
    argv = ["reason", "-m", str(saved), "-i", str(images), "-o", str(tmp_path / "o"), "--device", "cpu"]
    assert batch_main(argv) == 2
    assert "image_a, image_b and statement" in capsys.readouterr().err
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "img0.png", "statement": "x"}) + "\n")
    argv[4] = str(tmp_path / "m.jsonl")
    assert batch_main(argv) == 2
    assert "no image_a and no image_b column" in capsys.readouterr().err


def test_convert_writes_our_layout(nlvr, tmp_path, capsys):
    model, saved, images = nlvr
    pth = saved.parent / "model" / "model_base_nlvr.pth"
    out = tmp_path / "converted"
    argv = ["convert", str(pth), str(out), "--tokenizer", str(saved.parent / "model")]
    assert cli_main(argv) == 0
    assert "'nlvr' model" in capsys.readouterr().out
    again = blip.load(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BlipForVisualReasoning"]
    want = _expected(model, images, "img0.png", "img2.png", "two shapes")
    assert abs(_expected(again, images, "img0.png", "img2.png", "two shapes").score - want.score) < 1e-6
