"""CapFilt is a job kind on the batch jobs' engines: no engine code of its own, the engines' options (torchrun
timeout, single-process fallback), the output folder's lock and ownership rules, one-line disk errors."""

from __future__ import annotations

import ast
import datetime
import errno
import json
from pathlib import Path

import pytest
import torch
from capfilt_helpers import records_bytes

import blip.capfilt
import blip.jobs.engines as engines
import blip.jobs.writer as writer
from blip.capfilt import DATASET, CapfiltConfig, run_capfilt
from blip.capfilt.cli import capfilt_main
from blip.capfilt.core import CapfiltKind
from blip.jobs.lock import OutputLock

torch.set_num_threads(1)

FAST = dict(batch_size=4, shard_size=6, max_new_tokens=6, min_new_tokens=2, workers=0)
FAST_ARGS = [
    "--batch-size",
    "4",
    "--shard-size",
    "6",
    "--max-new-tokens",
    "6",
    "--min-new-tokens",
    "2",
    "--no-progress",
]


def _args(model_dirs, data, out, *extra):
    captioner, filter_ = model_dirs
    return ["--captioner", str(captioner), "--filter", str(filter_), "--data", str(data), "--out", str(out)] + [
        *FAST_ARGS,
        *extra,
    ]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_capfilt_has_no_engine_of_its_own():
    """The process group, the Ray actors and the thread pools live in blip.jobs; CapFilt only imports them."""
    banned = ("torch.distributed", "ray", "concurrent.futures", "threading")
    for path in sorted(Path(blip.capfilt.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith(banned) for a in node.names), (path.name, ast.unparse(node))
            elif isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith(banned), (path.name, ast.unparse(node))
            elif isinstance(node, ast.Attribute):
                assert node.attr not in ("init_process_group", "all_gather_object", "remote"), path.name


def test_run_capfilt_goes_through_the_jobs_engine(models, shapes_dir, tmp_path, monkeypatch):
    captioner, filter_ = models
    jobs = []
    real = engines.run_local

    def spy(job):
        jobs.append(job)
        return real(job)

    monkeypatch.setattr(engines, "run_local", spy)
    summary = run_capfilt(captioner, filter_, shapes_dir, tmp_path / "out", CapfiltConfig(**FAST), progress=False)
    assert [type(j.kind) for j in jobs] == [CapfiltKind] and summary.complete and summary.engine == "local"
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["fingerprint"] == jobs[0].fingerprint and manifest["capfilt"] == "blip-capfilt/1"
    assert manifest["owns"]["names"][-3:] == ["bootstrap.jsonl", "summary.json", "images"]
    assert manifest["owns"]["shard_files"] == {"prefix": "records", "extensions": ["jsonl"], "count": 4}

    # --engine torchrun without a torchrun launch: the single-process fallback
    again = run_capfilt(captioner, filter_, shapes_dir, tmp_path / "t", CapfiltConfig(engine="torchrun", **FAST), False)
    assert again.engine == "local" and records_bytes(tmp_path / "t") == records_bytes(tmp_path / "out")


class _Stop(Exception):
    pass


def test_torchrun_timeout_is_an_option(models, model_dirs, shapes_dir, tmp_path, monkeypatch, capsys):
    """As for `blip batch`: how long ranks wait for each other is `dist_timeout_s` (`--dist-timeout`), not 24 h."""
    import torch.distributed as dist

    captioner, filter_ = models
    timeouts = []

    def init_process_group(backend, timeout):
        timeouts.append(timeout)
        raise _Stop

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    cfg = CapfiltConfig(engine="torchrun", dist_timeout_s=90, **FAST)
    with pytest.raises(_Stop):
        run_capfilt(captioner, filter_, shapes_dir, tmp_path / "out", cfg, progress=False)
    with pytest.raises(_Stop):
        capfilt_main(_args(model_dirs, shapes_dir, tmp_path / "out", "--dist-timeout", "600"))
    assert timeouts == [datetime.timedelta(seconds=90), datetime.timedelta(seconds=600)]


def test_a_capfilt_folder_in_use_is_refused(model_dirs, shapes_dir, tmp_path, capsys):
    import os

    out = tmp_path / "out"
    with OutputLock(out):
        assert capfilt_main(_args(model_dirs, shapes_dir, out)) == 2
        line = _one_line(capsys)
        assert "in use by another job" in line and f"pid {os.getpid()} " in line
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written by the refused job


def test_only_what_the_manifest_names_is_deleted(model_dirs, shapes_dir, tmp_path, capsys):
    # a dataset folder of the user's own: refused with and without --overwrite, byte for byte
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "0001.png").write_bytes(b"an image of mine")
    (mine / DATASET).write_text('{"image": "images/0001.png", "caption": "my caption"}\n')
    before = _snapshot(mine)
    assert capfilt_main(_args(model_dirs, shapes_dir, mine)) == 2
    assert "not empty (bootstrap.jsonl, images)" in _one_line(capsys)
    assert capfilt_main(_args(model_dirs, shapes_dir, mine, "--overwrite")) == 2
    assert "holds bootstrap.jsonl, images, which this job would write" in _one_line(capsys)
    assert _snapshot(mine) == before

    # --out a file
    (tmp_path / "file").write_text("x")
    for extra in ((), ("--overwrite",)):
        assert capfilt_main(_args(model_dirs, shapes_dir, tmp_path / "file", *extra)) == 2
        assert "is a file, not a folder" in _one_line(capsys)

    # CapFilt's own folder: --overwrite replaces its records, dataset, summary and images/, nothing else
    out = tmp_path / "out"
    shards = str(shapes_dir / "web-00000{0,1}.tar")
    assert capfilt_main(_args(model_dirs, shards, out, "--threshold", "0")) == 0
    assert len(list((out / "images").iterdir())) == 24
    (out / "notes.md").write_text("my notes")
    assert capfilt_main(_args(model_dirs, shards, out, "--threshold", "2", "--shard-size", "30", "--overwrite")) == 0
    assert (out / "notes.md").read_text() == "my notes"
    assert not (out / "images").exists() and (out / DATASET).read_text() == ""  # nothing kept: no image copied
    assert sorted(p.name for p in out.glob("records-*")) == ["records-000000.jsonl"]
    assert json.loads((out / "summary.json").read_text())["options"]["threshold"] == 2


def test_a_full_disk_is_one_line_and_a_rerun_resumes(model_dirs, shapes_dir, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert capfilt_main(_args(model_dirs, shapes_dir, reference)) == 0
    capsys.readouterr()
    calls = {"n": 0}
    real = writer.Journal.append

    def full(self, record):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, record)

    monkeypatch.setattr(writer.Journal, "append", full)
    out = tmp_path / "out"
    assert capfilt_main(_args(model_dirs, shapes_dir, out)) == 2
    line = _one_line(capsys)
    assert line.startswith(f"blip capfilt: error: no space left on the device of {out}") and "resumes" in line
    monkeypatch.undo()
    assert capfilt_main(_args(model_dirs, shapes_dir, out)) == 0
    assert "resumed" in capsys.readouterr().err
    assert records_bytes(out) == records_bytes(reference)
    assert (out / DATASET).read_bytes() == (reference / DATASET).read_bytes()
