"""`blip batch` in process: every good row exactly once, every bad row reported, results equal the Python API,
resume skips finished work, a changed job is refused, outputs in every format."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from jobs_helpers import read_errors, read_rows, read_vectors, run_embed

import blip
from blip.jobs import BatchConfig, InputOptions, TaskOptions, run_batch
from blip.jobs.cli import batch_main

SCORE_TOL = 1e-4  # docs/outputs.md: scores agree within 1e-4 whatever the batch (the texts and tokens exactly)


def _manifest(tmp_path, folder, good):
    """A JSONL manifest: the good images by relative path (ids m0..), missing files, a row without an image, an
    unsupported URL scheme and a line that is not JSON."""
    lines = [
        json.dumps({"id": f"m{i}", "image": f"images/{rel}", "question": "what is it?"}) for i, rel in enumerate(good)
    ]
    lines += [
        json.dumps({"id": "missing-1", "image": "images/nope.png", "question": "what is it?"}),
        json.dumps({"id": "missing-2", "image": "/definitely/not/here.jpg", "question": "what is it?"}),
        json.dumps({"id": "no-image", "question": "what is it?"}),
        json.dumps({"id": "ftp", "image": "ftp://example.com/a.png", "question": "what is it?"}),
        "{this is not json",
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    good_ids = [f"m{i}" for i in range(len(good))]
    bad_ids = {"missing-1": "no such file", "missing-2": "no such file", "no-image": "no image", "ftp": "scheme"}
    bad_ids["line " + str(len(lines))] = "not valid json"
    return path, good_ids, bad_ids


def _check_rows(out, good_ids, bad_ids):
    rows, errors = read_rows(out), read_errors(out)
    counts = Counter(r["image"] for r in rows)
    assert counts == Counter(good_ids), "every good row exactly once"
    assert {e["image"] for e in errors} == set(bad_ids) and len(errors) == len(bad_ids)
    for error in errors:
        assert bad_ids[error["image"]].lower() in error["error"].lower(), error
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["rows_ok"] == len(good_ids) and manifest["rows_failed"] == len(bad_ids)
    assert not list(out.rglob("*.tmp")) and not (out / "_work").exists()
    return rows


def test_folder_with_bad_files(caption_model, image_folder, tmp_path, capsys):
    folder, good, bad = image_folder
    out = tmp_path / "out"
    argv = ["caption", "--model", str(caption_model), "--input", str(folder), "--out", str(out)]
    code = batch_main([*argv, "--batch-size", "3", "--shard-size", "5", "--max-new-tokens", "8", "--no-progress"])
    assert code == 1, "failed rows -> exit code 1"
    err = capsys.readouterr().err
    assert "errors.jsonl" in err and f"{len(good)} ok, {len(bad)} failed" in err
    rows = _check_rows(out, good, bad)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["skipped_files"] == 1  # notes.txt; the hidden file is not even counted

    model = blip.load(caption_model)
    expected = model.caption([str(folder / r["image"]) for r in rows], max_new_tokens=8)
    for row, cap in zip(rows, expected):
        assert row["caption"] == cap.text
        assert row["score"] == pytest.approx(cap.score, abs=SCORE_TOL)

    # a rerun skips everything; the output is untouched
    before = {p.name: p.read_bytes() for p in out.glob("part-*")}
    assert batch_main([*argv, "--batch-size", "3", "--shard-size", "5", "--max-new-tokens", "8"]) == 1
    assert "resumed" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.glob("part-*")} == before


def test_manifest_with_missing_paths_vqa(vqa_model, image_folder, tmp_path):
    folder, good, _ = image_folder
    manifest, good_ids, bad_ids = _manifest(tmp_path, folder, good)
    out = tmp_path / "out"
    cfg = BatchConfig(
        task="vqa", model=str(vqa_model), input=str(manifest), out=str(out), batch_size=4, shard_size=6, progress=False
    )
    result = run_batch(cfg)
    assert result.exit_code == 1
    rows = _check_rows(out, good_ids, bad_ids)
    model = blip.load(vqa_model)
    expected = model.answer([str(folder / good[int(r["image"][1:])]) for r in rows], [r["question"] for r in rows])
    for row, ans in zip(rows, expected):
        assert row["answer"] == ans.text and row["score"] == pytest.approx(ans.score, abs=SCORE_TOL)


def test_vqa_questions_for_every_image_and_rank_mode(vqa_model, image_folder, tmp_path):
    folder, good, bad = image_folder
    questions = ["how many shapes?", "what colour is the circle?"]
    out = tmp_path / "out"
    cfg = BatchConfig(
        task="vqa",
        model=str(vqa_model),
        input=str(folder),
        out=str(out),
        batch_size=5,
        progress=False,
        inputs=InputOptions(questions=tuple(questions)),
        options=TaskOptions(answers=("one", "two", "red", "blue")),
    )
    run_batch(cfg)
    rows = read_rows(out)
    assert [(r["image"], r["question"]) for r in rows] == [(g, q) for g in good for q in questions]
    assert len(read_errors(out)) == len(bad) * len(questions)
    model = blip.load(vqa_model)
    paths = [str(folder / r["image"]) for r in rows]
    expected = model.answer(paths, [r["question"] for r in rows], answers=["one", "two", "red", "blue"])
    assert [r["answer"] for r in rows] == [a.text for a in expected]


def test_match_csv_and_parquet_equal_jsonl(retrieval_model, image_folder, tmp_path):
    pytest.importorskip("pyarrow", reason="--format parquet needs pyarrow")
    import pyarrow.parquet as pq

    folder, good, _ = image_folder
    csv_path = tmp_path / "pairs.csv"
    texts = ["a red circle", "two dogs on a beach", "a blue square on the left"]
    lines = ["path,text"] + [f"images/{g},{texts[i % 3]}" for i, g in enumerate(good)] + ["images/missing.png,x"]
    csv_path.write_text("\n".join(lines) + "\n")
    outs = {}
    for fmt in ("jsonl", "parquet"):
        out = tmp_path / fmt
        code = batch_main(
            [
                "match",
                "-m",
                str(retrieval_model),
                "-i",
                str(csv_path),
                "-o",
                str(out),
                "--format",
                fmt,
                "--shard-size",
                "4",
            ]
        )
        assert code == 1
        outs[fmt] = out
    rows = read_rows(outs["jsonl"])
    table_rows = [r for p in sorted(outs["parquet"].glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert table_rows == rows
    assert [r["image"] for r in rows] == [f"images/{g}" for g in good]
    probs = blip.load(retrieval_model).match([str(folder / g) for g in good], [texts[i % 3] for i in range(len(good))])
    assert [r["score"] for r in rows] == pytest.approx(probs, abs=SCORE_TOL)
    assert read_errors(outs["parquet"]) == read_errors(outs["jsonl"])


@pytest.mark.parametrize("embed_format", ["npy", "safetensors"])
def test_embed_shards_equal_api(retrieval_model, image_folder, tmp_path, embed_format):
    folder, good, bad = image_folder
    out = tmp_path / "out"
    result = run_embed(retrieval_model, folder, out, embed_format)
    assert result.summary.rows_ok == len(good) and result.summary.rows_failed == len(bad)
    rows = read_rows(out)
    vectors = read_vectors(out, embed_format)
    matrix = np.concatenate(vectors)
    assert [r["image"] for r in rows] == good and matrix.shape[0] == len(good)
    expected = blip.load(retrieval_model).embed_images([str(folder / g) for g in good]).numpy()
    np.testing.assert_allclose(matrix, expected, atol=1e-5)
    assert result.index is not None and result.index["count"] == len(good)
    index_vectors = np.load(out / "index" / "vectors.npy")
    np.testing.assert_array_equal(index_vectors, matrix)


def test_changed_options_are_refused_unless_overwrite(caption_model, image_folder, tmp_path, capsys):
    folder, _, _ = image_folder
    out = tmp_path / "out"
    base = ["caption", "-m", str(caption_model), "-i", str(folder), "-o", str(out), "--max-new-tokens", "5"]
    assert batch_main(base) == 1
    capsys.readouterr()
    assert batch_main([*base, "--num-beams", "2"]) == 2
    err = capsys.readouterr().err
    assert "different job" in err and "num_beams was 1, now 2" in err and "--overwrite" in err
    assert batch_main([*base[:-1], "6"]) == 2  # max_new_tokens changed
    assert "max_new_tokens was 5, now 6" in capsys.readouterr().err
    # what does not change results may change: batch size, workers, prefetch
    assert batch_main([*base, "--batch-size", "2", "--workers", "1", "--prefetch", "1"]) == 1
    assert batch_main([*base, "--num-beams", "2", "--overwrite"]) == 1
    assert json.loads((out / "_manifest.json").read_text())["job"]["options"]["num_beams"] == 2


def test_sampled_captions_do_not_depend_on_batching(caption_model, image_folder, tmp_path, capsys):
    """Sampling with a seed: each row samples from its own generator (seeded by the seed and the row id), so batch
    size and shard size change nothing, a rerun resumes the same job, and the sampling options are in its
    fingerprint."""
    folder, good, _ = image_folder
    common = ["caption", "-m", str(caption_model), "-i", str(folder), "--max-new-tokens", "6", "--num-captions", "2"]
    sampling = ["--sample", "--top-p", "0.95", "--top-k", "40", "--temperature", "1.5", "--seed", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert batch_main([*common, *sampling, "-o", str(a), "--batch-size", "1", "--shard-size", "3"]) == 1
    assert batch_main([*common, *sampling, "-o", str(b), "--batch-size", "5"]) == 1
    rows_a, rows_b = read_rows(a), read_rows(b)
    assert len(rows_a) == len(good) and all(len(r["captions"]) == 2 for r in rows_a)
    assert [r["captions"] for r in rows_a] == [r["captions"] for r in rows_b]
    flat = [score for r in rows_a for score in r["scores"]]
    assert flat == pytest.approx([score for r in rows_b for score in r["scores"]], abs=SCORE_TOL)
    assert len({tuple(r["captions"]) for r in rows_a}) > 1
    options = json.loads((a / "_manifest.json").read_text())["job"]["options"]
    assert options | {"do_sample": True, "top_p": 0.95, "top_k": 40, "temperature": 1.5, "seed": 3} == options
    capsys.readouterr()
    assert batch_main([*common, *sampling, "-o", str(a), "--batch-size", "2", "--shard-size", "3"]) == 1
    assert "resumed" in capsys.readouterr().err
    assert batch_main([*common, *sampling[:-1], "4", "-o", str(a), "--shard-size", "3"]) == 2
    assert "seed was 3, now 4" in capsys.readouterr().err
    other = tmp_path / "c"
    assert batch_main([*common, *sampling[:-1], "4", "-o", str(other)]) == 1
    assert [r["captions"] for r in read_rows(other)] != [r["captions"] for r in rows_a]
    # without sampling the job's options (and so the fingerprints of existing jobs) are as they were
    assert batch_main([*common[:-2], "-o", str(tmp_path / "d")]) == 1
    greedy = json.loads((tmp_path / "d" / "_manifest.json").read_text())["job"]["options"]
    assert set(greedy) == {
        "prompt", "num_beams", "max_new_tokens", "min_new_tokens", "num_captions", "repetition_penalty",
        "length_penalty",
    }  # fmt: skip


def test_other_model_and_missing_head_are_refused(caption_model, vqa_model, image_folder, tmp_path, capsys):
    folder, _, _ = image_folder
    out = tmp_path / "out"
    assert batch_main(["caption", "-m", str(caption_model), "-i", str(folder), "-o", str(out)]) == 1
    capsys.readouterr()
    assert batch_main(["caption", "-m", str(vqa_model), "-i", str(folder), "-o", str(out)]) == 2
    assert "the model differs" in capsys.readouterr().err
    assert batch_main(["caption", "-m", str(vqa_model), "-i", str(folder), "-o", str(tmp_path / "new")]) == 2
    assert "no head for 'caption'" in capsys.readouterr().err


def test_foreign_output_folder_is_refused(caption_model, image_folder, tmp_path, capsys):
    folder, _, _ = image_folder
    out = tmp_path / "somebody"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert batch_main(["caption", "-m", str(caption_model), "-i", str(folder), "-o", str(out)]) == 2
    assert "not a blip batch output folder" in capsys.readouterr().err
    assert batch_main(["caption", "-m", str(caption_model), "-i", str(folder), "-o", str(out), "--overwrite"]) == 1
    assert (out / "thesis.tex").read_text() == "precious"  # --overwrite removes only what a batch job writes


def test_output_inside_input_is_not_read_back(caption_model, image_folder, capsys):
    folder, good, bad = image_folder
    out = folder / "results"
    assert batch_main(["caption", "-m", str(caption_model), "-i", str(folder), "-o", str(out)]) == 1
    assert batch_main(["caption", "-m", str(caption_model), "-i", str(folder), "-o", str(out)]) == 1
    assert "resumed" in capsys.readouterr().err
    assert len(read_rows(out)) == len(good)


def test_inference_failure_fails_only_that_row(caption_model, image_folder, tmp_path, monkeypatch):
    """An image that decodes but breaks the model (here: a patched task function) fails its row, not the job."""
    import blip.tasks.batch as runner  # the jobs' rows reach the task functions through its dispatch

    folder, good, bad = image_folder
    poisoned = folder / good[4]
    real = runner.caption_images

    def flaky(model, images, **kwargs):
        if any(im.tobytes() == poison for im in images):
            raise RuntimeError("boom")
        return real(model, images, **kwargs)

    from blip.jobs.sources import Row, read_image

    poison = read_image(Row("x", str(poisoned)), 32).tobytes()
    monkeypatch.setattr(runner, "caption_images", flaky)
    out = tmp_path / "out"
    result = run_batch(
        BatchConfig(
            task="caption", model=str(caption_model), input=str(folder), out=str(out), batch_size=4, progress=False
        )
    )
    errors = {e["image"]: e["error"] for e in read_errors(out)}
    assert errors[good[4]] == "inference failed: RuntimeError: boom"
    assert result.summary.rows_ok == len(good) - 1
    assert len(read_rows(out)) == len(good) - 1


def test_usage_errors(caption_model, tmp_path, capsys):
    assert (
        batch_main(["caption", "-m", str(caption_model), "-i", str(tmp_path / "nothing"), "-o", str(tmp_path / "o")])
        == 2
    )
    assert "no such file or folder" in capsys.readouterr().err
    folder = tmp_path / "imgs"
    folder.mkdir()
    assert (
        batch_main(
            ["caption", "-m", str(caption_model), "-i", str(folder), "-o", str(tmp_path / "o"), "--num-captions", "3"]
        )
        == 2
    )
    assert "num_beams" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        batch_main(["caption", "-m", str(caption_model), "-i", str(folder)])  # no --out


def test_webdataset_shards_equal_the_manifest(retrieval_model, tmp_path):
    """The shapes world's WebDataset shards (brace pattern) and its JSONL manifest give the same match scores."""
    from blip.data import shapes

    world = tmp_path / "world"
    shapes.generate(
        world, seed=2, n_clean=0, n_web=40, n_vqa=0, n_test=0, webdataset=True, shard_size=16, progress=False
    )
    common = ["match", "-m", str(retrieval_model), "--shard-size", "10", "--batch-size", "8"]
    assert batch_main([*common, "-i", str(world / "web-{000000..000002}.tar"), "-o", str(tmp_path / "wds")]) == 0
    assert batch_main([*common, "-i", str(world / "web.jsonl"), "-o", str(tmp_path / "jsonl")]) == 0
    wds, manifest = read_rows(tmp_path / "wds"), read_rows(tmp_path / "jsonl")
    assert [r["image"] for r in wds] == [f"web-{i // 16:06d}.tar/{i:06d}" for i in range(40)]
    assert [r["image"] for r in manifest] == [f"web-{i:06d}" for i in range(40)]
    assert [(r["text"], r["score"]) for r in wds] == [(r["text"], r["score"]) for r in manifest]


def test_manifest_urls(caption_model, image_folder, tmp_path, monkeypatch):
    """http(s) rows are fetched; a URL that fails is that row's error. (Through the safe fetcher, with loopback
    allowed as in the server tests: the default refuses it, see test_url_rows.py.)"""
    import functools
    import http.server
    import threading

    import blip.jobs.sources as sources
    from blip.fetch import SyncFetcher

    monkeypatch.setattr(sources, "_url_fetcher", SyncFetcher(allow_loopback=True))
    folder, good, _ = image_folder
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        lines = [json.dumps({"url": f"{base}/{g}"}) for g in good[:3]] + [json.dumps({"url": f"{base}/nothing.png"})]
        (tmp_path / "urls.jsonl").write_text("\n".join(lines) + "\n")
        out = tmp_path / "out"
        assert (
            batch_main(["caption", "-m", str(caption_model), "-i", str(tmp_path / "urls.jsonl"), "-o", str(out)]) == 1
        )
    finally:
        server.shutdown()
    rows = read_rows(out)
    assert [r["image"] for r in rows] == [f"{base}/{g}" for g in good[:3]]
    expected = blip.load(caption_model).caption([str(folder / g) for g in good[:3]])
    assert [r["caption"] for r in rows] == [c.text for c in expected]
    assert read_errors(out) == [
        {"image": f"{base}/nothing.png", "error": f"cannot fetch {base}/nothing.png: the server answered HTTP 404"}
    ]
