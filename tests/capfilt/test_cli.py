"""`blip capfilt ...`: exit codes, usage errors that name the problem, resume and --overwrite."""

from __future__ import annotations

import json

import torch
from capfilt_helpers import bad_manifest, read_jsonl

from blip.capfilt import DATASET, read_records
from blip.capfilt.cli import capfilt_main

torch.set_num_threads(1)

FAST = ["--batch-size", "4", "--shard-size", "8", "--max-new-tokens", "6", "--min-new-tokens", "1", "--no-progress"]


def _args(model_dirs, data, out, *extra):
    captioner, filter_ = model_dirs
    return [
        "--captioner",
        str(captioner),
        "--filter",
        str(filter_),
        "--data",
        str(data),
        "--out",
        str(out),
        *FAST,
        *extra,
    ]


def test_exit_codes_ok_failed_rows_and_resume(model_dirs, shapes_dir, tmp_path, capsys):
    out = tmp_path / "ok"
    assert capfilt_main(_args(model_dirs, shapes_dir, out, "--threshold", "0", "--keep-clean", str(shapes_dir))) == 0
    err = capsys.readouterr().err
    assert "24 rows, 0 failed" in err and str(out / DATASET) in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["texts_out"] == 24 + 24 + 30 and summary["complete"]

    # the same command again resumes (nothing to do); other options are refused, naming the change
    assert capfilt_main(_args(model_dirs, shapes_dir, out, "--threshold", "0", "--keep-clean", str(shapes_dir))) == 0
    assert "resumed" in capsys.readouterr().err
    assert capfilt_main(_args(model_dirs, shapes_dir, out, "--threshold", "0.7")) == 2
    err = capsys.readouterr().err
    assert "threshold was 0.0, now 0.7" in err and "--overwrite" in err
    assert capfilt_main(_args(model_dirs, shapes_dir, out, "--threshold", "2", "--overwrite")) == 0
    assert json.loads((out / "summary.json").read_text())["texts_out"] == 0

    manifest, bad = bad_manifest(shapes_dir, tmp_path / "data")
    out = tmp_path / "failed"
    assert capfilt_main(_args(model_dirs, manifest, out)) == 1
    assert str(out / "errors.jsonl") in capsys.readouterr().err
    assert sorted(e["image"] for e in read_jsonl(out / "errors.jsonl")) == sorted(bad)


def test_usage_errors_name_the_problem(model_dirs, shapes_dir, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "web.jsonl"
    assert capfilt_main(_args(model_dirs, missing, tmp_path / "o1")) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err and "Traceback" not in err

    captioner, filter_ = model_dirs
    gone = tmp_path / "no_model"
    argv = [
        "--captioner",
        str(gone),
        "--filter",
        str(filter_),
        "--data",
        str(shapes_dir),
        "--out",
        str(tmp_path / "o2"),
    ]
    assert capfilt_main(argv) == 2
    assert str(gone) in capsys.readouterr().err

    argv = ["--captioner", str(filter_), "--filter", str(filter_), "--data", str(shapes_dir), "--out", str(tmp_path)]
    assert capfilt_main(argv) == 2
    assert "captioner" in capsys.readouterr().err

    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "mine.txt").write_text("someone's file")
    assert capfilt_main(_args(model_dirs, shapes_dir, tmp_path / "o3")) == 2
    assert "not empty" in capsys.readouterr().err

    assert capfilt_main(_args(model_dirs, shapes_dir, tmp_path / "o4", "--num-captions", "0")) == 2
    assert "num-captions" in capsys.readouterr().err
    assert capfilt_main(["--captioner", "x"]) == 2  # argparse: missing required options
    assert capfilt_main(["--help"]) == 0


def test_passthrough_columns_that_clash_are_renamed(model_dirs, shapes_dir, tmp_path):
    rows = [json.loads(line) for line in (shapes_dir / "web.jsonl").read_text().splitlines()[:3]]
    manifest = tmp_path / "m.csv"
    lines = ["path,text,synthetic,label"]
    lines += [f"{shapes_dir / r['image']},{r['caption']},theirs,{r['noise']}" for r in rows]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert capfilt_main(_args(model_dirs, manifest, out)) == 0
    records = list(read_records(out))
    assert [r["label"] for r in records] == [r["noise"] for r in rows]
    assert all(r["input_synthetic"] == "theirs" and isinstance(r["synthetic"], list) for r in records)
    assert [r["image"] for r in records] == [str(shapes_dir / r["image"]) for r in rows]


def test_blip_capfilt_subcommand(model_dirs, shapes_dir, tmp_path):
    from blip.cli import main

    assert main(["capfilt", *_args(model_dirs, shapes_dir, tmp_path / "out")]) == 0
    assert (tmp_path / "out" / DATASET).exists()
