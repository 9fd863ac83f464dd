"""Helpers shared by the CapFilt tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import blip
from blip.config import get_preset
from blip.data.vocab import config_for, shapes_tokenizer


def make_models(folder: Path) -> tuple[blip.Blip, blip.Blip]:
    """A tiny caption model and a tiny retrieval (ITM) model, saved to `folder`/captioner and `folder`/filter and
    loaded back from there (so `.source` names the folder)."""
    tokenizer = shapes_tokenizer()
    out = []
    for name, kind, seed in (("captioner", "caption", 1), ("filter", "retrieval", 2)):
        model = blip.create_model(
            config_for(tokenizer, get_preset("blip_test").replace(kind=kind)), tokenizer, seed=seed
        )
        model.save(folder / name)
        out.append(blip.load(folder / name, batch_size=8))
    return out[0], out[1]


def bad_manifest(shapes_dir: Path, folder: Path, n_good: int = 10) -> tuple[Path, dict[str, str]]:
    """A manifest in `folder` with the first `n_good` web rows of the shapes world (absolute image paths) plus a
    corrupt image, a missing image and a row without an image. Returns (manifest, {bad id: reason fragment})."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (shapes_dir / "web.jsonl").read_text().splitlines()[:n_good]]
    for row in rows:
        row["image"] = str(shapes_dir / row["image"])
    good = shapes_dir / "images/web/000000.png"
    shutil.copy(good, folder / "corrupt.png")
    data = bytearray((folder / "corrupt.png").read_bytes())
    data[60:] = bytes(len(data) - 60)  # header kept, pixel data zeroed: PNG checksums fail
    (folder / "corrupt.png").write_bytes(bytes(data))
    bad = [
        {"id": "bad-corrupt", "image": "corrupt.png", "caption": "a red circle", "noise": "correct"},
        {"id": "bad-missing", "image": "missing.png", "caption": "a blue square", "noise": "junk"},
        {"id": "bad-noimage", "caption": "a green star", "noise": "junk"},
    ]
    rows = rows[:3] + bad[:2] + rows[3:] + bad[2:]
    manifest = folder / "web.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, {"bad-corrupt": "", "bad-missing": "", "bad-noimage": "no image"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def records_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.glob("records-*.jsonl")))
