"""A checkpoint's fingerprint covers every byte of its files, is cached outside the model folder by file identity,
and survives a broken cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from blip.weights import fingerprint as fp


@pytest.fixture
def model_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    # three 4 MiB tensors: the middle one lies past the first and before the last 4 MiB of the file
    tensors = {f"t{i}": torch.full((1024, 1024), float(i + 1)) for i in range(3)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "blip"}))
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    return folder, tensors


def test_zeroing_a_middle_tensor_changes_the_fingerprint(model_folder):
    folder, tensors = model_folder
    before = fp.model_fingerprint(folder)
    assert before["files"] == ["config.json", "model.safetensors", "vocab.txt"]
    tensors["t1"] = torch.zeros(1024, 1024)
    save_file(tensors, str(folder / "model.safetensors"))
    assert fp.model_fingerprint(folder)["sha256"] != before["sha256"]


def test_the_same_bytes_elsewhere_have_the_same_fingerprint(model_folder, tmp_path):
    import shutil

    folder, _ = model_folder
    shutil.copytree(folder, tmp_path / "copy")
    assert fp.model_fingerprint(tmp_path / "copy") == fp.model_fingerprint(folder)
    (tmp_path / "copy" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n")
    assert fp.model_fingerprint(tmp_path / "copy") != fp.model_fingerprint(folder)


def test_a_second_call_reads_no_file_and_nothing_is_written_into_the_model_folder(model_folder, tmp_path, monkeypatch):
    folder, _ = model_folder
    names = sorted(p.name for p in folder.iterdir())
    first = fp.model_fingerprint(folder)
    opened = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fp, "open", counting_open, raising=False)
    assert fp.model_fingerprint(folder) == first
    assert not [p for p in opened if str(folder) in p], opened
    assert sorted(p.name for p in folder.iterdir()) == names
    assert (tmp_path / "cache" / fp.CACHE_FILE).is_file()
    # a changed file is hashed again (its stat changed), the others come from the cache
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n")
    assert fp.model_fingerprint(folder) != first
    assert [p for p in opened if str(folder) in p] == [str(folder / "vocab.txt")]


@pytest.mark.parametrize("broken", ["corrupt", "not a dict", "unwritable"])
def test_a_broken_cache_is_ignored(model_folder, tmp_path, monkeypatch, broken):
    folder, _ = model_folder
    expected = fp.model_fingerprint(folder)
    cache = tmp_path / "cache" / fp.CACHE_FILE
    if broken == "corrupt":
        cache.write_bytes(b"\x00{not json")
    elif broken == "not a dict":
        cache.write_text("[1, 2, 3]")
    else:
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where the cache folder should be")
        monkeypatch.setenv("BLIP_CACHE_DIR", str(blocker / "cache"))
    assert fp.model_fingerprint(folder) == expected
    assert fp.model_fingerprint(folder) == expected


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("BLIP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fp.cache_dir() == tmp_path / "xdg" / "blip"
    monkeypatch.setenv("BLIP_CACHE_DIR", str(tmp_path / "mine"))
    assert fp.cache_dir() == tmp_path / "mine"


def test_no_home_folder_fingerprints_without_the_cache(model_folder, monkeypatch):
    """A process whose user has no home (HOME unset, no passwd entry) still fingerprints: nothing is cached."""
    from pathlib import Path

    folder, _ = model_folder
    want = fp.model_fingerprint(folder)

    def no_home(self: Path) -> Path:
        if str(self).startswith("~"):
            raise RuntimeError("Could not determine home directory.")
        return self

    monkeypatch.delenv("BLIP_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "expanduser", no_home)
    assert fp.model_fingerprint(folder) == want
