"""One home per concern: the server's micro-batches and the jobs' rows go through one dispatch function (the import
rules between packages are in tests/test_layout.py)."""

from __future__ import annotations

import ast
import io
import tarfile
from pathlib import Path

import pytest

import blip
from blip.tasks.retrieval import read_source_image
from oracle import make_images, png_bytes

SRC = Path(blip.__file__).parent


def test_one_runner_name_and_one_image_merge():
    classes, merges = [], []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name == "TaskRunner":
                classes.append(str(path.relative_to(SRC)))
            if isinstance(node, ast.FunctionDef) and node.name == "merge_images":
                merges.append(str(path.relative_to(SRC)))
    assert classes == [] and merges == ["tasks/batch.py"]


def test_server_batches_and_job_rows_share_one_dispatch(captioner, caption_dir, tmp_path, monkeypatch):
    """Both reach the caption task through `blip.tasks.batch`, which shares an image's encoding across requests."""
    pytest.importorskip("fastapi")
    import base64

    from fastapi.testclient import TestClient

    import blip.tasks.batch as batch
    from blip.jobs import BatchConfig, run_batch
    from blip.serve import create_app

    calls: list[str] = []
    real = batch.caption_images

    def spy(model, images, **kwargs):
        calls.append(f"{len(images)} images")
        return real(model, images, **kwargs)

    monkeypatch.setattr(batch, "caption_images", spy)
    image = {"b64": base64.b64encode(png_bytes(make_images(1)[0])).decode()}
    with TestClient(create_app({"c": captioner})) as client:
        r = client.post("/v1/caption", json={"images": [image, image]})
        assert r.status_code == 200, r.text
    assert calls == ["1 images"]  # two request images, one distinct: encoded once

    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(make_images(2)):
        im.save(folder / f"{i}.png")
    manifest = tmp_path / "rows.jsonl"  # three rows, two of them the same image
    manifest.write_text("".join(f'{{"id": "r{i}", "image": "images/{n}.png"}}\n' for i, n in enumerate([0, 1, 0])))
    out = tmp_path / "out"
    result = run_batch(BatchConfig(task="caption", model=str(caption_dir), input=str(manifest), out=str(out)))
    assert result.summary.rows_ok == 3 and calls[1:] == ["2 images"]


def test_collection_rows_are_read_from_files_tar_members_and_urls(tmp_path):
    image = make_images(1)[0]
    data = png_bytes(image)
    (tmp_path / "a.png").write_bytes(data)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("x.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as tar:
        member = tar.getmember("x.png")
    span = f"tar://{shard}#{member.offset_data}:{member.size}"
    for source in (str(tmp_path / "a.png"), span):
        assert read_source_image("row", source).tobytes() == image.tobytes()
    fetched = []
    got = read_source_image("row", "https://example.test/a.png", lambda url: fetched.append(url) or data)
    assert got.tobytes() == image.tobytes() and fetched == ["https://example.test/a.png"]
    with pytest.raises(OSError, match="no URL fetcher"):
        read_source_image("row", "https://example.test/a.png")
