"""The `blip` command line end to end on transformers-made tiny checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import blip
from blip.cli import main
from blip.weights import convert
from oracle import TinySpec, make_images

CAPTION = TinySpec(kind="caption", seed=21)
VQA = TinySpec(kind="vqa", seed=22)
RETRIEVAL = TinySpec(kind="retrieval", seed=23)


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i, image in enumerate(make_images(3, seed=5)):
        path = tmp_path / f"img{i}.{'png' if i % 2 else 'jpg'}"
        image.save(path)
        paths.append(str(path))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(paths[0], "rb").read()[:200])
    return paths, str(corrupt), str(truncated)


def run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_caption_jsonl_with_bad_images(hf_checkpoints, image_files, capsys):
    folder = hf_checkpoints(CAPTION)
    good, corrupt, truncated = image_files
    code, out, err = run(
        capsys,
        [
            "caption",
            "--model",
            str(folder),
            *good[:2],
            corrupt,
            good[2],
            truncated,
            "--num-beams",
            "3",
            "--max-new-tokens",
            "8",
            "--format",
            "jsonl",
        ],
    )
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    by_image = {r["image"]: r for r in rows}
    expected = blip.load(folder).caption(good, num_beams=3, max_new_tokens=8)
    for path, cap in zip(good, expected):
        assert by_image[path]["caption"] == cap.text
        assert by_image[path]["score"] == pytest.approx(cap.score, abs=1e-5)
    assert corrupt in by_image[corrupt]["error"] and truncated in by_image[truncated]["error"]
    assert "corrupt.png" in err and "Traceback" not in err


def test_caption_text_output_and_prompt(hf_checkpoints, image_files, capsys):
    good, _, _ = image_files
    code, out, _ = run(capsys, ["caption", "-m", str(hf_checkpoints(CAPTION)), good[0], "--prompt", "a picture of"])
    assert code == 0
    path, text = out.strip().split("\t")
    assert path == good[0] and text.startswith("a picture of")


def test_vqa_several_questions_about_one_image(hf_checkpoints, image_files, capsys):
    folder = hf_checkpoints(VQA)
    good, _, _ = image_files
    code, out, _ = run(
        capsys,
        [
            "vqa",
            "--model",
            str(folder),
            "--image",
            good[0],
            "--question",
            "how many dogs?",
            "--question",
            "what colour?",
            "--format",
            "jsonl",
        ],
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    expected = blip.load(folder).answer(good[0], ["how many dogs?", "what colour?"])
    assert [r["question"] for r in rows] == ["how many dogs?", "what colour?"]
    assert [r["answer"] for r in rows] == [a.text for a in expected]


def test_vqa_rank_mode_from_answer_list(hf_checkpoints, image_files, capsys, tmp_path):
    good, _, _ = image_files
    answers = tmp_path / "answers.txt"
    answers.write_text("yes\nno\ntwo\n")
    code, out, _ = run(
        capsys,
        [
            "vqa",
            "-m",
            str(hf_checkpoints(VQA)),
            "--image",
            good[0],
            "--question",
            "is it?",
            "--answers",
            str(answers),
            "--format",
            "jsonl",
        ],
    )
    assert code == 0 and json.loads(out)["answer"] in {"yes", "no", "two"}


def test_empty_question_is_a_usage_error(hf_checkpoints, image_files, capsys):
    good, _, _ = image_files
    code, _, err = run(capsys, ["vqa", "-m", str(hf_checkpoints(VQA)), "--image", good[0], "--question", "  "])
    assert code == 2 and "question" in err and "Traceback" not in err


def test_match_and_similarity(hf_checkpoints, image_files, capsys):
    folder = hf_checkpoints(RETRIEVAL)
    good, _, _ = image_files
    long_text = " ".join(["red circle"] * 60)  # far beyond 35 tokens: truncated, not an error
    code, out, _ = run(
        capsys,
        ["match", "-m", str(folder), "--image", good[0], "--text", "a dog", "--text", long_text, "--format", "jsonl"],
    )
    assert code == 0
    scores = [json.loads(line)["score"] for line in out.splitlines()]
    assert scores == pytest.approx(blip.load(folder).match(good[0], ["a dog", long_text]), abs=1e-6)
    code, out, _ = run(
        capsys, ["similarity", "-m", str(folder), "--image", good[0], "--image", good[1], "--text", "a", "--text", "b"]
    )
    assert code == 0 and len(out.splitlines()) == 4


def test_unsupported_task_and_missing_model(hf_checkpoints, image_files, capsys, tmp_path):
    good, _, _ = image_files
    code, _, err = run(capsys, ["vqa", "-m", str(hf_checkpoints(CAPTION)), "--image", good[0], "--question", "what?"])
    assert code == 2 and "VQA checkpoint" in err
    code, _, err = run(capsys, ["caption", "-m", str(tmp_path / "missing_dir"), good[0]])
    assert code == 2 and "missing_dir" in err and "Traceback" not in err


def test_convert_pth_round_trip(hf_checkpoints, image_files, capsys, tmp_path):
    folder = hf_checkpoints(CAPTION)
    original = convert.to_salesforce(load_file(str(folder / "model.safetensors")))
    pth = tmp_path / "model_base_caption.pth"
    torch.save({"model": original}, pth)
    code, out, _ = run(
        capsys, ["convert", str(pth), str(tmp_path / "hf"), "--tokenizer", str(folder), "--config", str(folder)]
    )
    assert code == 0 and "caption" in out
    good, _, _ = image_files
    converted = blip.load(tmp_path / "hf").caption(good, num_beams=2, max_new_tokens=8)
    reference = blip.load(folder).caption(good, num_beams=2, max_new_tokens=8)
    assert [c.token_ids for c in converted] == [c.token_ids for c in reference]


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "blip.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("caption", "vqa", "match", "similarity", "convert", "demo"):
        assert command in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "blip.cli", "caption", "--help"], capture_output=True, text=True, check=True
    )
    assert "--num-beams" in out.stdout and "--format" in out.stdout
