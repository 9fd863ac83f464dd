"""`blip batch` with tiny BLIP-2 checkpoints (OPT, T5, retrieval): every row equals the Python API (captions,
answers with the checkpoint's or a given prompt template, ITM, and the [Q, E] query features of embed), sampled rows
depend on their seed alone, a job stopped mid-shard (with a torn journal line) resumes to the bytes of an
uninterrupted run, and what a BLIP-2 checkpoint cannot do is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from jobs_helpers import read_errors, read_rows, read_vectors, run_embed

import blip
from blip.jobs import BatchConfig, InputOptions, TaskOptions, run_batch
from blip.jobs import runner as runner_module
from blip.jobs.cli import batch_main
from oracle_blip2 import Blip2Spec, build_blip2_checkpoint

pytest.importorskip("transformers")

SCORE_TOL = 1e-4  # docs/outputs.md: scores agree within 1e-4 whatever the batch (texts and tokens exactly)
QUESTIONS = ("what is in the picture?", "how many shapes?")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny BLIP-2 checkpoint folder per kind, built once for the module."""
    return {
        kind: build_blip2_checkpoint(tmp_path_factory.mktemp(f"b2jobs_{kind}"), Blip2Spec(kind=kind, seed=seed))
        for kind, seed in (("opt", 31), ("t5", 32), ("retrieval", 33))
    }


@pytest.fixture(scope="module")
def models(checkpoints):
    return {kind: blip.load(folder) for kind, folder in checkpoints.items()}


def _check_errors(out, bad, per_image: int = 1):
    errors = read_errors(out)
    assert len(errors) == len(bad) * per_image and {e["image"] for e in errors} == set(bad)
    for error in errors:
        assert bad[error["image"]] in error["error"].lower(), error


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_caption_rows_equal_the_api(checkpoints, models, image_folder, tmp_path, kind):
    folder, good, bad = image_folder
    out = tmp_path / "out"
    argv = ["caption", "-m", str(checkpoints[kind]), "-i", str(folder), "-o", str(out), "--no-progress"]
    argv += ["--batch-size", "3", "--shard-size", "5", "--num-beams", "2", "--max-new-tokens", "6"]
    argv += ["--prompt", "a photo of"] if kind == "opt" else []
    assert batch_main(argv) == 1  # the bad files
    rows = read_rows(out)
    assert [r["image"] for r in rows] == good
    _check_errors(out, bad)
    prompt = {"prompt": "a photo of"} if kind == "opt" else {}
    expected = models[kind].caption([str(folder / g) for g in good], num_beams=2, max_new_tokens=6, **prompt)
    assert [r["caption"] for r in rows] == [c.text for c in expected]
    assert [r["score"] for r in rows] == pytest.approx([c.score for c in expected], abs=SCORE_TOL)
    assert len({r["caption"] for r in rows}) > 1  # not a degenerate model: the comparison can fail


@pytest.mark.parametrize(("kind", "template"), [("opt", None), ("t5", "Q: {} A:")])
def test_vqa_rows_equal_the_api(checkpoints, models, image_folder, tmp_path, kind, template):
    folder, good, bad = image_folder
    out = tmp_path / "out"
    cfg = BatchConfig(
        task="vqa",
        model=str(checkpoints[kind]),
        input=str(folder),
        out=str(out),
        batch_size=4,
        shard_size=7,
        progress=False,
        inputs=InputOptions(questions=QUESTIONS),
        options=TaskOptions(prompt_template=template, max_new_tokens=5),
    )
    assert run_batch(cfg).exit_code == 1
    rows = read_rows(out)
    assert [(r["image"], r["question"]) for r in rows] == [(g, q) for g in good for q in QUESTIONS]
    _check_errors(out, bad, per_image=len(QUESTIONS))
    paths = [str(folder / r["image"]) for r in rows]
    expected = models[kind].answer(paths, [r["question"] for r in rows], max_new_tokens=5, prompt_template=template)
    assert [r["answer"] for r in rows] == [a.text for a in expected]
    assert [r["score"] for r in rows] == pytest.approx([a.score for a in expected], abs=SCORE_TOL)
    options = json.loads((out / "_manifest.json").read_text())["job"]["options"]
    assert options.get("prompt_template") == template  # part of the job: another template is another job


def test_sampled_captions_depend_on_the_seed_alone(checkpoints, image_folder, tmp_path):
    folder, _, _ = image_folder
    runs = {}
    for batch_size in (2, 5):
        out = tmp_path / f"b{batch_size}"
        argv = ["caption", "-m", str(checkpoints["opt"]), "-i", str(folder), "-o", str(out), "--no-progress"]
        argv += [
            "--do-sample",
            "--seed",
            "7",
            "--max-new-tokens",
            "6",
            "--batch-size",
            str(batch_size),
            "--limit",
            "10",
        ]
        batch_main(argv)
        runs[batch_size] = read_rows(out)
    assert len(runs[2]) == 6 and [r["caption"] for r in runs[2]] == [r["caption"] for r in runs[5]]
    assert [r["score"] for r in runs[2]] == pytest.approx([r["score"] for r in runs[5]], abs=SCORE_TOL)


def test_match_rows_equal_the_api(checkpoints, models, image_folder, tmp_path):
    folder, good, _ = image_folder
    texts = ("a red circle", "two blue squares")
    out = tmp_path / "match"
    argv = ["match", "-m", str(checkpoints["retrieval"]), "-i", str(folder), "-o", str(out), "--no-progress"]
    assert batch_main([*argv, "--text", texts[0], "--text", texts[1], "--batch-size", "5"]) == 1
    rows = read_rows(out)
    assert [(r["image"], r["text"]) for r in rows] == [(g, t) for g in good for t in texts]
    expected = models["retrieval"].match([str(folder / g) for g in good for _ in texts], list(texts) * len(good))
    assert [r["score"] for r in rows] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("embed_format", ["npy", "safetensors"])
def test_embed_rows_are_the_query_features_of_the_api(checkpoints, models, image_folder, tmp_path, embed_format):
    folder, good, bad = image_folder
    model, paths = models["retrieval"], [str(folder / g) for g in good]
    out = tmp_path / "embed"
    result = run_embed(checkpoints["retrieval"], folder, out, embed_format)
    assert result.summary.rows_ok == len(good) and result.summary.rows_failed == len(bad)
    vectors = read_vectors(out, embed_format)
    q, e = model.config.num_query_tokens, model.config.image_text_hidden_size
    assert all(v.ndim == 3 and v.shape[1:] == (q, e) and v.dtype == np.float32 for v in vectors)  # [rows, Q, E]
    matrix = np.concatenate(vectors)
    assert [r["image"] for r in read_rows(out)] == good and matrix.shape == (len(good), q, e)
    np.testing.assert_allclose(matrix, model.embed_images(paths).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=-1), 1.0, atol=1e-5)  # each query feature normalised
    np.testing.assert_array_equal(np.load(out / "index" / "vectors.npy"), matrix)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["index"]["family"] == "blip2" and manifest["index"]["vectors_per_image"] == q
    assert manifest["index"]["count"] == len(good) and manifest["index"]["dim"] == e


class _Crash(BaseException):
    """Stands in for the process dying: not an Exception, so nothing in the job catches it."""


@pytest.mark.parametrize("task", ["vqa", "embed"])
def test_stopped_mid_shard_with_a_torn_journal_resumes_to_the_same_bytes(
    checkpoints, image_folder, tmp_path, monkeypatch, task
):
    """The job dies after a few batches (journals on disk, one shard committed), a half-written batch line is left
    at a journal's end (what kill -9 during the append leaves); the rerun equals an uninterrupted run byte for byte:
    answers with a prompt template (T5), and the [rows, Q, E] query features through the journal (retrieval)."""
    folder, _, _ = image_folder

    def config(out):
        model = checkpoints["t5" if task == "vqa" else "retrieval"]
        options = TaskOptions(prompt_template="Q: {} A:", max_new_tokens=4) if task == "vqa" else TaskOptions()
        inputs = InputOptions(questions=QUESTIONS[:1]) if task == "vqa" else InputOptions()
        return BatchConfig(
            task=task,
            model=str(model),
            input=str(folder),
            out=str(out),
            batch_size=2,
            shard_size=7,
            progress=False,
            inputs=inputs,
            options=options,
        )

    reference = tmp_path / "reference"
    run_batch(config(reference))

    real_run, calls = runner_module.RowRunner.run, {"n": 0}

    def dying_run(self, rows, decoded):
        calls["n"] += 1
        if calls["n"] == 6:  # shard 0 (4 batches) committed, shard 1 half done
            raise _Crash
        return real_run(self, rows, decoded)

    monkeypatch.setattr(runner_module.RowRunner, "run", dying_run)
    out = tmp_path / "out"
    with pytest.raises(_Crash):
        run_batch(config(out))
    monkeypatch.undo()
    journals = list((out / "_work").glob("*.journal"))
    assert len(journals) == 1 and len(list((out / "_receipts").glob("*.json"))) == 1
    with open(journals[0], "ab") as f:
        f.write(b'{"start": 4, "items": [{"ok": {"image": "torn')  # a batch cut mid-line

    result = run_batch(config(out))
    assert result.resumed and result.summary.complete
    ref_files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ref_files
    for name in ref_files:
        if name.startswith("part-") or name == "errors.jsonl":
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    if task == "embed":
        assert np.load(out / "part-000001.npy").ndim == 3
        np.testing.assert_array_equal(np.load(out / "index" / "vectors.npy"), np.load(reference / "index/vectors.npy"))


def test_what_a_blip2_checkpoint_cannot_do_is_one_line(checkpoints, image_folder, tmp_path, capsys):
    folder, _, _ = image_folder

    def refused(argv, *fragments):
        out = tmp_path / f"x{len(list(tmp_path.iterdir()))}"
        assert batch_main([*argv, "-i", str(folder), "-o", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        for fragment in fragments:
            assert fragment in lines[0], lines[0]

    refused(["embed", "-m", str(checkpoints["opt"])], "BLIP-2", "'opt'")
    refused(["match", "-m", str(checkpoints["t5"]), "--text", "a dog"], "BLIP-2", "'t5'")
    refused(["caption", "-m", str(checkpoints["retrieval"])], "BLIP-2", "'retrieval'")
    refused(["vqa", "-m", str(checkpoints["opt"]), "--question", "what?", "--answers", '["a", "b"]'], "BLIP-2")
    refused(["vqa", "-m", str(checkpoints["t5"]), "--question", "what?", "--prompt-template", "Q: A:"], "{}")
