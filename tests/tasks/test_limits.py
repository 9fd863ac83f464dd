"""Limits that depend on the model are checked before any work, on every face: more new tokens than the model has
text positions is refused up front (not an IndexError after minutes of decoding), and a wrong argument type is a
clear error naming the argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import blip
from blip.tasks.options import OptionError
from oracle import make_images, png_bytes

_SCRIPT = Path(sys.executable).with_name("blip")  # the installed `blip` command of this environment
BLIP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "blip.cli"]


def blip_command(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*BLIP, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def no_model_calls(monkeypatch):
    """Fails the test if a model runs its vision encoder (i.e. any work starts)."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("the model ran before the limits were checked")

    monkeypatch.setattr("blip.models.blip.BlipModel.encode_image", refuse)


def test_api_refuses_more_tokens_than_positions_before_any_work(captioner, answerer, no_model_calls):
    image = make_images(1)[0]
    with pytest.raises(OptionError, match=r"^max_new_tokens: .*over the model's 64 text positions") as caught:
        captioner.caption(image, max_new_tokens=100, min_new_tokens=90)
    assert caught.value.field == "max_new_tokens"
    with pytest.raises(OptionError, match="over the model's 64 text positions"):
        captioner.caption(image, prompt="a picture of " * 10, max_new_tokens=40)
    with pytest.raises(OptionError, match=r"^max_new_tokens: .*64 text positions"):
        answerer.answer(image, "what?", max_new_tokens=64)


def test_api_takes_the_most_tokens_that_fit(captioner, answerer):
    image = make_images(1)[0]
    assert len(captioner.caption(image, max_new_tokens=63, min_new_tokens=63)[0].token_ids) == 64
    assert answerer.answer(image, "what?", max_new_tokens=63)[0].token_ids


def test_api_names_a_wrong_argument_type(captioner):
    with pytest.raises(TypeError, match=r"^images: expected a PIL image, a path or the bytes .* got int"):
        captioner.caption(123)
    with pytest.raises(TypeError, match=r"^images\[1\]: .* got NoneType"):
        captioner.caption([make_images(1)[0], None])


def test_cli_refuses_the_budget_in_one_line(caption_dir, tmp_path):
    image = tmp_path / "a.png"
    make_images(1)[0].save(image)
    for command in (
        ["caption", "--model", str(caption_dir), str(image), "--max-new-tokens", "100", "--min-new-tokens", "90"],
        ["batch", "caption", "-m", str(caption_dir), "-i", str(tmp_path), "-o", str(tmp_path / "out"),
         "--max-new-tokens", "100", "--min-new-tokens", "90", "--device", "cpu", "--no-progress"],
    ):  # fmt: skip
        done = blip_command(*command)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "max_new_tokens: " in lines[0] and "over the model's 64 text positions" in lines[0], lines
    assert not list((tmp_path / "out").glob("part-*")), "the job refused before writing rows"


def test_server_refuses_the_budget(captioner, answerer):
    pytest.importorskip("fastapi")
    import base64

    from fastapi.testclient import TestClient

    from blip.serve import ServeSettings, create_app

    image = {"b64": base64.b64encode(png_bytes(make_images(1)[0])).decode()}
    app = create_app({"c": captioner, "v": answerer}, ServeSettings(max_new_tokens=1024))
    with TestClient(app) as client:
        r = client.post("/v1/caption", json={"images": [image], "max_new_tokens": 100, "min_new_tokens": 90})
        assert r.status_code == 422 and r.json()["error"]["field"] == "max_new_tokens", r.text
        assert "64 text positions" in r.json()["error"]["message"]
        body = {"images": [image], "questions": [["what?"]], "max_new_tokens": 64}
        r = client.post("/v1/vqa", json=body)
        assert r.status_code == 422 and r.json()["error"]["field"] == "max_new_tokens", r.text


def test_answers_longer_than_the_positions_are_refused(answerer):
    with pytest.raises(OptionError, match="^answers: item 1 has more tokens"):
        answerer.answer(make_images(1)[0], "what?", answers=["yes", "dog " * 80])


def test_vqa_cli_reads_answers_from_a_file(vqa_dir, tmp_path, capsys):
    from blip.cli import main

    image = tmp_path / "a.png"
    make_images(1)[0].save(image)
    answers = tmp_path / "answers.txt"
    answers.write_text("yes\nno\n\nred\n")
    argv = ["vqa", "--model", str(vqa_dir), "--image", str(image), "--question", "what?", "--format", "jsonl"]
    assert main([*argv, "--answers", str(answers)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["answer"] in ("yes", "no", "red")
    expected = blip.load(vqa_dir).answer(str(image), "what?", answers=["yes", "no", "red"])[0]
    assert row["answer"] == expected.text
    assert Path(answers).exists()
