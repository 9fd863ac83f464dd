"""The same job under torchrun (2 ranks) and on a local Ray cluster gives the same rows as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from jobs_helpers import assert_same_rows, read_errors, read_rows

from blip.jobs.cli import batch_main


def _job_args(model, folder, *extra):
    return ["caption", "--model", str(model), "--input", str(folder), "--batch-size", "3", "--shard-size", "4", *extra]


def _same_output(out, reference):
    assert_same_rows(read_rows(out), read_rows(reference))
    assert read_errors(out) == read_errors(reference)
    manifest = json.loads((out / "_manifest.json").read_text())
    ref_manifest = json.loads((reference / "_manifest.json").read_text())
    assert manifest["shards"] == ref_manifest["shards"] and manifest["complete"]
    assert manifest["fingerprint"] == ref_manifest["fingerprint"]
    return manifest


@pytest.fixture
def reference(caption_model, image_folder, tmp_path):
    folder, _, _ = image_folder
    out = tmp_path / "single"
    assert batch_main([*_job_args(caption_model, folder), "--out", str(out)]) == 1
    return out


def test_torchrun_two_ranks(caption_model, image_folder, reference, tmp_path):
    folder, _, _ = image_folder
    out = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "blip.jobs", "batch", *_job_args(caption_model, folder), "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "failed rows" in proc.stderr  # exit code 1 on every rank: rows failed
    manifest = _same_output(out, reference)
    assert manifest["engine"] == "torchrun x2"
    assert proc.stderr.count("ok, 4 failed") == 1, "only rank 0 reports"

    # a rerun under torchrun resumes (nothing left to do) and changes nothing
    before = {p.name: p.read_bytes() for p in out.glob("part-*")}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert "resumed" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.glob("part-*")} == before


def test_ray_local_cluster(caption_model, image_folder, reference, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    folder, _, _ = image_folder
    out = tmp_path / "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code = batch_main([*_job_args(caption_model, folder), "--out", str(out), "--engine", "ray"])
    finally:
        ray.shutdown()
    assert code == 1
    manifest = _same_output(out, reference)
    assert manifest["engine"] == "ray x2"


def test_ray_missing_gives_a_clear_error(caption_model, image_folder, tmp_path, monkeypatch, capsys):
    folder, _, _ = image_folder
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code = batch_main([*_job_args(caption_model, folder), "--out", str(tmp_path / "o"), "--engine", "ray"])
    assert code == 2
    assert "pip install 'blip-vl[scale]'" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_ranks_are_refused_together_when_the_folder_is_in_use(caption_model, image_folder, tmp_path):
    """Rank 0 takes the output folder's lock for every rank; when another job holds it, all ranks stop, none
    waits for the others."""
    from blip.jobs.lock import OutputLock

    folder, _, _ = image_folder
    out = tmp_path / "busy"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "blip.jobs", "batch", *_job_args(caption_model, folder), "--out", str(out), "--no-progress"]
    with OutputLock(out):
        proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: {out} is in use by another job (pid {os.getpid()} ") == 2, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == []
