"""A training checkpoint's tokenizer files are texts under a fixed set of names, read in memory: a checkpoint can
never choose a path that is written (the attack: a `.pth` file dropped into site-packages runs at the next start)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blip
from blip.config import get_preset
from blip.data.vocab import config_for, shapes_tokenizer
from blip.models.blip import BlipModel
from blip.weights.checkpoint import FORMAT, VERSION, atomic_save, config_to_dict, tokenizer_to_dict


def _checkpoint(path: Path, tokenizer_files: dict[str, str]) -> Path:
    tokenizer = shapes_tokenizer()
    config = config_for(tokenizer, get_preset("blip_test").replace(kind="caption"))
    model = BlipModel(config)
    atomic_save(
        {
            "format": FORMAT,
            "version": VERSION,
            "model": model.state_dict(),
            "model_config": config_to_dict(config),
            "tokenizer": tokenizer_files,
        },
        path,
    )
    return path


def _evil_files(target: Path) -> dict[str, str]:
    files = tokenizer_to_dict(shapes_tokenizer())
    files[str(target)] = "import os; os.system('touch /tmp/pwned')\n"  # absolute
    files["../" * 12 + str(target).lstrip("/") + ".2"] = "x"  # relative escape
    return files


def test_a_good_checkpoint_loads_its_tokenizer_from_memory(tmp_path):
    path = _checkpoint(tmp_path / "good.pt", tokenizer_to_dict(shapes_tokenizer()))
    model = blip.load(path)
    assert model.tokenizer.vocab_size == shapes_tokenizer().vocab_size
    assert model.tokenizer.encode("a red circle") == shapes_tokenizer().encode("a red circle")


def test_tokenizer_file_names_that_are_paths_are_refused_and_nothing_is_written(tmp_path):
    target = tmp_path / "site-packages" / "evil.pth"
    target.parent.mkdir()
    path = _checkpoint(tmp_path / "evil.pt", _evil_files(target))
    with pytest.raises(ValueError, match="unexpected tokenizer file name"):
        blip.load(path)
    assert not target.exists()
    assert not Path(str(target) + ".2").exists()
    assert list(target.parent.iterdir()) == []


def test_the_cli_refuses_the_evil_checkpoint_in_one_line(tmp_path):
    target = tmp_path / "evil.pth"
    path = _checkpoint(tmp_path / "evil.pt", _evil_files(target))
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(image)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "blip.cli", "caption", "--model", str(path), str(image)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "unexpected tokenizer file name" in result.stderr
    assert "Traceback" not in result.stderr
    assert not target.exists()


def test_non_text_tokenizer_entries_are_refused(tmp_path):
    files: dict = tokenizer_to_dict(shapes_tokenizer())
    files["vocab.txt"] = torch.zeros(3)
    path = _checkpoint(tmp_path / "odd.pt", files)
    with pytest.raises(ValueError, match="tokenizer entry must map file names to text"):
        blip.load(path)
