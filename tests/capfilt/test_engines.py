"""Scale-out engines give the records and dataset of a one-process run: `torchrun --nproc_per_node 2 -m blip.capfilt`
and `--engine ray`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from capfilt_helpers import records_bytes

from blip.capfilt import DATASET
from blip.capfilt.cli import capfilt_main


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(model_dirs, shapes_dir, tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    captioner, filter_ = model_dirs
    args = ["--captioner", str(captioner), "--filter", str(filter_), "--data", str(shapes_dir)]
    args += ["--batch-size", "4", "--shard-size", "5", "--threads", "1", "--no-progress"]
    assert capfilt_main([*args, "--out", str(tmp_path / "one")]) == 0
    command = [torchrun, "--nproc_per_node", "2", "-m", "blip.capfilt", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert records_bytes(tmp_path / "two") == records_bytes(tmp_path / "one")
    assert (tmp_path / "two" / DATASET).read_bytes() == (tmp_path / "one" / DATASET).read_bytes()
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["engine"] == "torchrun x2"


@pytest.mark.slow
def test_ray_actors_equal_one_process(model_dirs, shapes_dir, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    captioner, filter_ = model_dirs
    args = ["--captioner", str(captioner), "--filter", str(filter_), "--data", str(shapes_dir)]
    args += ["--batch-size", "4", "--shard-size", "5", "--threads", "1", "--no-progress"]
    assert capfilt_main([*args, "--out", str(tmp_path / "one")]) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert capfilt_main([*args, "--out", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    finally:
        ray.shutdown()
    assert records_bytes(tmp_path / "ray") == records_bytes(tmp_path / "one")
    assert (tmp_path / "ray" / DATASET).read_bytes() == (tmp_path / "one" / DATASET).read_bytes()
    assert json.loads((tmp_path / "ray" / "summary.json").read_text())["engine"] == "ray x2"
