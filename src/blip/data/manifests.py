"""Datasets described by files: JSONL/CSV/TSV manifests, Karpathy/COCO caption json, VQAv2 question files, and the
manifests a dataset folder holds by default.

Every path a user takes with COCO works on the shapes world too:

- a folder: the task's default manifest in it (shapes world: `web.jsonl` for pretraining, `clean.jsonl` for caption
  and retrieval fine-tuning, `vqa.jsonl` for VQA; `test.jsonl` / `vqa_test.jsonl` for evaluation), its Karpathy
  file, or (training) its `*.tar` shards;
- `.jsonl` / `.csv` / `.tsv` manifests with an image-path column and a caption column (one caption or a list), or for
  VQA `question` + `answers` (or `answer`);
- `.json`: a Karpathy split file (`dataset_coco.json`: `images[].sentences`, `filepath`, `split`), COCO caption
  annotations (`captions_*.json`), a VQAv2 questions file (its annotations file is found by replacing "questions"
  with "annotations" in the name), or a list of rows (the original BLIP json files);
- WebDataset `.tar` shards (a file, a glob, a brace pattern, or a folder of them): see `blip.data.webdataset`.

`read_records` is the one JSONL/CSV/TSV reader: every record with its line number, and a problem instead of a record
for a line that cannot be one (broken JSON, not an object, more CSV fields than the header names). Training and
evaluation read captions and questions through `read_caption_rows` / `read_questions`, which skip bad rows and count
them in a `SkipLog`; the batch jobs (`blip.jobs.sources`) plan one row per record and keep the problems as failed rows.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

# Image-path columns, in order of preference: the training readers' names and the batch jobs' (which also take URLs).
IMAGE_COLUMNS = (
    *("image", "image_path", "filepath", "file_name", "filename", "file", "path", "img", "url", "image_url"),
    *("video", "video_path"),  # video collections (`blip batch embed`): the file is read as a video
)
CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "raw")
MANIFEST_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".json": "json"}
TRAIN_MANIFESTS = {"pretrain": "web", "caption": "clean", "retrieval": "clean", "vqa": "vqa"}
EVAL_MANIFESTS = {"caption": "test", "retrieval": "test", "vqa": "vqa_test", "pretrain": "test"}
COCO_SUBTYPES = re.compile(r"^(train|val|test)20\d\d$")


class DataError(ValueError):
    """A source that cannot be used at all (not found, unknown format, unreadable, no usable rows)."""


@dataclass
class SkipLog:
    """Counts of skipped rows by reason, with a few examples each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, int]:
        return dict(self.counts)

    def report(self, name: str) -> None:
        if self.total:
            details = "; ".join(f"{r}: {n} (e.g. {', '.join(self.examples[r])})" for r, n in self.counts.items())
            _logger.warning("%s: skipped %d bad rows — %s", name, self.total, details)


@dataclass(frozen=True)
class Pair:
    image: str  # path
    text: str
    image_id: int  # index of the distinct image
    negatives: tuple[str, ...] = ()  # texts known to be false for the image (a manifest's `negatives` column)


@dataclass(frozen=True)
class Question:
    image: str
    question: str
    answers: tuple[str, ...]  # human answers, repeats kept (weights come from the counts)
    question_id: Any = None
    answer_type: str = ""

    def answer_weights(self) -> tuple[list[str], list[float]]:
        """Distinct answers and their share of the votes (VQAv2 weighting)."""
        counts = Counter(self.answers)
        total = sum(counts.values())
        answers = list(counts)
        return answers, [counts[a] / total for a in answers]


# --- JSONL / CSV / TSV records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    line: int  # where the record ends in the file (1-based)
    data: dict[str, Any] | None  # None when the line is not a record
    problem: str | None = None  # why it is not, e.g. "line 3: not valid JSON (...)"


@dataclass
class Manifest:
    path: Path
    records: list[Record]
    columns: list[str]  # column names in the order first seen (CSV: the header)


def manifest_format(path: str | os.PathLike) -> str | None:
    """ "jsonl", "csv", "tsv" or "json" by the file's suffix; None for anything else."""
    return MANIFEST_FORMATS.get(Path(path).suffix.lower())


def read_records(path: str | os.PathLike, fmt: str | None = None) -> Manifest:
    """Every record of a JSONL, CSV or TSV manifest (`fmt`, default: by suffix), in file order, with its line number.
    CSV cells that are empty are left out of the record. A byte-order mark is ignored. Raises DataError when the file
    cannot be read at all."""
    path = Path(path)
    fmt = fmt or manifest_format(path)
    if fmt not in ("jsonl", "csv", "tsv"):
        raise DataError(f"{path}: not a JSONL, CSV or TSV manifest")
    try:
        with path.open(encoding="utf-8-sig", newline="" if fmt != "jsonl" else None) as f:
            return _read_csv(path, f, fmt) if fmt != "jsonl" else _read_jsonl(path, f)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the manifest {path}: {e}") from e


def _read_jsonl(path: Path, lines: Any) -> Manifest:
    records: list[Record] = []
    columns: dict[str, None] = {}
    for line, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            records.append(Record(line, None, f"line {line}: not valid JSON ({e.msg})"))
            continue
        if not isinstance(data, dict):
            records.append(Record(line, None, f"line {line}: expected a JSON object, got {type(data).__name__}"))
            continue
        columns.update(dict.fromkeys(data))
        records.append(Record(line, data))
    return Manifest(path, records, list(columns))


def _read_csv(path: Path, f: Any, fmt: str) -> Manifest:
    reader = csv.DictReader(f, dialect="excel-tab" if fmt == "tsv" else "excel")
    records: list[Record] = []
    for row in reader:
        line = reader.line_num
        if None in row:  # more fields than the header names
            records.append(Record(line, None, f"line {line}: {len(row[None])} more fields than the header has"))
            continue
        records.append(Record(line, {k: v for k, v in row.items() if v not in (None, "")}))
    return Manifest(path, records, list(reader.fieldnames or []))


def read_json(path: str | os.PathLike) -> Any:
    """A whole `.json` file (Karpathy, COCO, VQAv2 or a list of rows). Raises DataError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


# --- source discovery --------------------------------------------------------------------------------------------


def resolve_sources(data: str, task: str, split: str = "", *, purpose: str = "train") -> list[str]:
    """The files a `data` spec names: comma-separated entries; a folder becomes its manifest for `task` (or
    `split`), its Karpathy file, or its tar shards; a .tar path, glob or brace pattern becomes the shards it names."""
    from blip.data.webdataset import expand_shards, is_shard_pattern

    sources: list[str] = []
    for entry in (e.strip() for e in data.split(",") if e.strip()):
        path = Path(entry).expanduser()
        if path.is_dir():
            sources.extend(folder_sources(path, task, split, purpose))
        elif is_shard_pattern(entry):
            shards = expand_shards(entry)
            if not shards:
                raise DataError(f"no tar shards match {entry}")
            sources.extend(shards)
        elif path.is_file():
            sources.append(str(path))
        else:
            raise DataError(f"data source not found: {entry}")
    if not sources:
        raise DataError(f"no data sources in {data!r}")
    return sources


def folder_sources(folder: Path, task: str, split: str = "", purpose: str = "train") -> list[str]:
    """A dataset folder's files for `task`: the `split` manifest when named, else the task's default manifest
    (`TRAIN_MANIFESTS` / `EVAL_MANIFESTS`), else its Karpathy file, else (training) its tar shards."""
    if "," in split:  # several manifests of one folder, e.g. "web,clean"
        return [
            s for part in split.split(",") if part.strip() for s in folder_sources(folder, task, part.strip(), purpose)
        ]
    default = (TRAIN_MANIFESTS if purpose == "train" else EVAL_MANIFESTS)[task]
    names = [split, f"{split}.jsonl", f"{split}.csv"] if split else []
    names += [f"{default}.jsonl", f"{default}.csv"]
    if task == "vqa" and purpose != "train":
        names.append("vqa_test_questions.json")
    for name in names:
        if name and (folder / name).is_file():
            return [str(folder / name)]
    karpathy = sorted(folder.glob("dataset_*.json"))
    if karpathy and task != "vqa":
        return [str(karpathy[0])]
    shards = sorted(str(p) for p in folder.glob("*.tar"))
    if shards and purpose == "train":
        return shards
    raise DataError(f"{folder}: no {'/'.join(n for n in names if n)} manifest, Karpathy json or tar shards")


# --- caption and question rows -----------------------------------------------------------------------------------


def _read_rows(path: Path, skips: SkipLog) -> list[dict[str, Any]] | dict[str, Any]:
    """A manifest's rows (bad lines skipped and counted), or a `.json` file's content."""
    fmt = manifest_format(path)
    if fmt == "json":
        return read_json(path)
    if fmt is None:
        raise DataError(f"{path}: unknown manifest format (expected .jsonl, .csv, .tsv, .json or .tar)")
    rows = []
    for record in read_records(path, fmt).records:
        if record.data is None:
            skips.skip("bad json" if fmt == "jsonl" else "bad csv row", f"{path.name}:{record.line}")
            continue
        rows.append(record.data)
    return rows


def first_value(row: dict[str, Any], preferred: str, fallbacks: tuple[str, ...]) -> Any:
    """The first non-empty value among `preferred` and then `fallbacks`, or None."""
    for key in (preferred, *fallbacks):
        if key in row and row[key] not in (None, ""):
            return row[key]
    return None


def texts_of(value: Any) -> list[str]:
    """A caption field as a list of strings: a string, or a list of strings / `{"raw"|"caption"|"answer": ...}`."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        out = []
        for v in value:
            if isinstance(v, dict):
                v = v.get("raw") or v.get("caption") or v.get("answer")
            if isinstance(v, str):
                out.append(v)
        return out
    return []


class _ImagePaths:
    """Resolve image paths against a root; remember which exist."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[str, str | None] = {}

    def __call__(self, rel: str) -> str | None:
        if rel not in self.cache:
            path = Path(rel).expanduser()
            path = path if path.is_absolute() else self.root / path
            self.cache[rel] = str(path) if path.is_file() else None
        return self.cache[rel]


def read_caption_rows(
    source: str,
    *,
    image_root: str = "",
    image_column: str = "image",
    text_column: str = "caption",
    split: str = "",
    skips: SkipLog | None = None,
) -> list[dict[str, Any]]:
    """Rows `{"id", "image" (path), "captions": [...]}`, one per image, from a manifest or caption json; rows of a
    manifest with a `negatives` column (texts false for the image) add `"negatives": [...]`."""
    skips = skips if skips is not None else SkipLog()
    path = Path(source)
    paths = _ImagePaths(Path(image_root) if image_root else path.parent)
    data = _read_rows(path, skips)
    images: dict[str, dict[str, Any]] = {}

    def add(key: Any, rel: Any, texts: list[str], where: str, negatives: Any = None) -> None:
        if not isinstance(rel, str) or not rel:
            skips.skip("no image column", where)
            return
        image = paths(rel)
        if image is None:
            skips.skip("missing image file", f"{where} ({rel})")
            return
        kept = [" ".join(t.split()) for t in texts if isinstance(t, str) and t.strip()]
        if not kept:
            skips.skip("empty text", where)
            return
        entry = images.setdefault(image, {"id": key if key is not None else rel, "image": image, "captions": []})
        entry["captions"].extend(kept)
        written = [" ".join(t.split()) for t in texts_of(negatives) if isinstance(t, str) and t.strip()]
        if written:
            entry.setdefault("negatives", []).extend(written)

    if isinstance(data, dict) and "images" in data and any("sentences" in im for im in data["images"]):
        wanted = {split or "train"} | ({"restval"} if (split or "train") == "train" else set())
        for im in data["images"]:
            if im.get("split") not in wanted:
                continue
            rel = os.path.join(im.get("filepath", ""), im.get("filename", "")) if im.get("filename") else None
            add(im.get("id", im.get("cocoid", rel)), rel, texts_of(im.get("sentences", [])), f"{path.name}:{rel}")
    elif isinstance(data, dict) and "annotations" in data and "images" in data:
        files = {im["id"]: im.get("file_name") for im in data["images"]}
        for ann in data["annotations"]:
            texts = texts_of(ann.get("caption"))
            add(ann.get("image_id"), files.get(ann.get("image_id")), texts, f"ann {ann.get('id')}")
    elif isinstance(data, list):
        for number, row in enumerate(data, 1):
            if not isinstance(row, dict):
                skips.skip("bad row", f"{path.name}:{number}")
                continue
            rel = first_value(row, image_column, IMAGE_COLUMNS)
            texts = texts_of(first_value(row, text_column, CAPTION_COLUMNS))
            add(row.get("id", row.get("image_id")), rel, texts, f"{path.name}:{number}", row.get("negatives"))
    else:
        raise DataError(f"{path}: not a caption manifest (rows, Karpathy or COCO caption json)")
    return list(images.values())


def read_pairs(sources: list[str], skips: SkipLog | None = None, **kwargs: Any) -> list[Pair]:
    """(image, caption) pairs from manifests; `image_id` numbers the distinct images across all sources."""
    skips = skips if skips is not None else SkipLog()
    pairs: list[Pair] = []
    ids: dict[str, int] = {}
    for source in sources:
        for row in read_caption_rows(source, skips=skips, **kwargs):
            image_id = ids.setdefault(row["image"], len(ids))
            negatives = tuple(row.get("negatives", ()))
            pairs.extend(Pair(row["image"], text, image_id, negatives) for text in row["captions"])
    return pairs


def _vqa_template(subtype: str) -> str:
    if COCO_SUBTYPES.match(subtype):
        return subtype + "/COCO_" + subtype + "_{image_id:012d}.jpg"
    return "images/" + subtype + "/{image_id:06d}.png"  # the shapes world


def read_questions(
    source: str,
    *,
    image_root: str = "",
    image_column: str = "image",
    image_template: str = "",
    skips: SkipLog | None = None,
) -> list[Question]:
    """VQA questions with their human answers from a `.jsonl`/`.csv`/list-json manifest or a VQAv2 questions file
    (+ its annotations file; without one the questions carry no answers)."""
    skips = skips if skips is not None else SkipLog()
    path = Path(source)
    paths = _ImagePaths(Path(image_root) if image_root else path.parent)
    data = _read_rows(path, skips)
    out: list[Question] = []
    if isinstance(data, dict) and "questions" in data:
        answers: dict[Any, tuple[tuple[str, ...], str]] = {}
        ann_path = path.with_name(path.name.replace("questions", "annotations"))
        if ann_path != path and ann_path.is_file():
            for ann in read_json(ann_path).get("annotations", []):
                texts = tuple(texts_of(ann.get("answers", [])))
                answers[ann["question_id"]] = (texts, ann.get("answer_type", ""))
        template = image_template or _vqa_template(str(data.get("data_subtype", "")))
        rows = [
            {
                "image": template.format(image_id=q["image_id"]),
                "question": q.get("question"),
                "answers": list(answers.get(q["question_id"], ((), ""))[0]),
                "answer_type": answers.get(q["question_id"], ((), ""))[1],
                "question_id": q["question_id"],
            }
            for q in data["questions"]
        ]
    elif isinstance(data, list):
        rows = data
    else:
        raise DataError(f"{path}: not a VQA manifest (rows with question/answers, or a VQAv2 questions file)")
    for number, row in enumerate(rows, 1):
        where = f"{path.name}:{number}"
        if not isinstance(row, dict):
            skips.skip("bad row", where)
            continue
        rel = first_value(row, image_column, IMAGE_COLUMNS)
        image = paths(rel) if isinstance(rel, str) and rel else None
        if image is None:
            skips.skip("missing image file", f"{where} ({rel})")
            continue
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            skips.skip("empty question", where)
            continue
        human = [a.strip() for a in texts_of(row.get("answers") or row.get("answer") or []) if a.strip()]
        qid = row.get("question_id", row.get("id", number - 1))
        out.append(Question(image, " ".join(question.split()), tuple(human), qid, str(row.get("answer_type", ""))))
    return out
