"""Noise that looks like failure stays out of what the user reads: faiss's CPU-feature probe (a ModuleNotFoundError
logged at INFO) and Ray's token-auth WARNING when `--engine ray` starts a local cluster. Through the real command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _blip(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "blip.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env or dict(os.environ))


def test_faiss_loader_probe_is_not_logged(retrieval_model, image_folder, tmp_path):
    pytest.importorskip("faiss", reason="faiss is not installed")
    folder, _, _ = image_folder
    args = ["embed", "--model", str(retrieval_model), "--input", str(folder), "--out", str(tmp_path / "o")]
    done = _blip("-v", "batch", *args)
    assert done.returncode in (0, 1), done.stderr  # 1: the folder holds bad images on purpose
    assert (tmp_path / "o" / "index" / "index.json").is_file()
    assert "INFO" in done.stderr  # -v is on: only faiss's probe is quiet
    assert "Could not load library" not in done.stderr and "ModuleNotFoundError" not in done.stderr


def test_ray_local_cluster_starts_without_the_token_auth_warning(caption_model, image_folder, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    folder, _, _ = image_folder
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    args = ["caption", "--model", str(caption_model), "--input", str(folder), "--out", str(tmp_path / "o")]
    done = _blip("batch", *args, "--engine", "ray", "--num-workers", "1", "--no-progress", env=env)
    assert done.returncode in (0, 1), done.stderr
    assert "ray x1" in (tmp_path / "o" / "_manifest.json").read_text()
    assert "Token authentication" not in done.stderr and "WARNING" not in done.stderr, done.stderr
