"""NLVR2 annotations: image pairs with a statement and a true/false label.

Two formats are read, each one record per pair:
- our manifests (`nlvr_<split>.jsonl` of the shapes world, or any JSONL/CSV): `image_a`, `image_b`,
  `statement` (or `sentence`), `label` (true/false, "True"/"False", 1/0);
- the original NLVR2 / BLIP annotation files (`nlvr_train.json`, a JSON list): `images` [left, right],
  `sentence`, `label` "True"/"False".
Relative image paths are resolved against `image_root` (default: the file's folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip.data.manifests import DataError, read_records

LABELS = {"true": True, "1": True, "false": False, "0": False}


@dataclass(frozen=True)
class NlvrPair:
    image_a: str  # absolute path (or URL) of the left image
    image_b: str
    statement: str
    label: bool
    id: str = ""
    template: str = ""  # the shapes world's statement template, for per-template accuracy ("" elsewhere)


def nlvr_source(data: str, split: str) -> Path:
    """The annotation file of `split` in `data` (a folder: nlvr_<split>.jsonl or .json) or `data` itself (a file)."""
    path = Path(data).expanduser()
    if path.is_file():
        return path
    for name in (f"nlvr_{split}.jsonl", f"nlvr_{split}.json"):
        if (path / name).is_file():
            return path / name
    raise DataError(f"{data}: no NLVR annotations for split {split!r} (looked for nlvr_{split}.jsonl / .json)")


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    key = str(value).strip().lower()
    if key not in LABELS:
        raise DataError(f"{where}: label {value!r} is not true/false")
    return LABELS[key]


def read_nlvr_pairs(path: str | Path, image_root: str = "") -> list[NlvrPair]:
    """Every pair of an annotation file, in order; a record without two images, a statement or a label is an
    error naming its line."""
    path = Path(path)
    root = Path(image_root).expanduser() if image_root else path.parent
    if path.suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of NLVR2 records")
        items = [(i + 1, r) for i, r in enumerate(records)]
    else:
        manifest = read_records(path)
        for r in manifest.records:
            if r.data is None:
                raise DataError(f"{path}: line {r.line}: {r.problem}")
        items = [(r.line, r.data) for r in manifest.records]
    pairs = []
    for line, record in items:
        where = f"{path}: record {line}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: not an object")
        images = record.get("images") or [record.get("image_a"), record.get("image_b")]
        statement = record.get("statement", record.get("sentence"))
        if len(images) != 2 or not all(isinstance(i, str) and i for i in images):
            raise DataError(f"{where}: needs two images (image_a, image_b or images: [left, right])")
        if not isinstance(statement, str) or not statement.strip():
            raise DataError(f"{where}: no statement")
        a, b = (i if i.startswith(("http://", "https://")) else str((root / i).resolve()) for i in images)
        ident = str(record.get("id", record.get("identifier", line)))
        pairs.append(NlvrPair(a, b, statement, _label(record.get("label"), where), ident, record.get("template", "")))
    return pairs
