"""Training and evaluation data: manifest readers, datasets, the global batch sampler, WebDataset streaming.

Sources (FACTS/DESIGN: every path a user takes with COCO works on the shapes world too):
- a folder: the task's default manifest in it (shapes world: `web.jsonl` for pretraining, `clean.jsonl` for caption
  and retrieval fine-tuning, `vqa.jsonl` for VQA; `test.jsonl` / `vqa_test.jsonl` for evaluation), or its
  `*.tar` shards;
- `.jsonl` / `.csv` / `.tsv` manifests with an image-path column and a caption column (one caption or a list), or for
  VQA `question` + `answers` (or `answer`);
- `.json`: a Karpathy split file (`dataset_coco.json`: `images[].sentences`, `filepath`, `split`), COCO caption
  annotations (`captions_*.json`), a VQAv2 questions file (its annotations file is found by replacing "questions"
  with "annotations" in the name), or a list of rows (the original BLIP json files);
- WebDataset `.tar` shards (a file, a glob, or a folder of them), streamed with the standard library's `tarfile`.

Bad rows never stop a run: rows whose image file is missing, whose text is empty or whose JSON is broken are skipped
when the manifest is read, images that fail to decode are replaced by the next row at load time, and all of it is
counted in a `SkipLog` and reported.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler

from blip.transforms import ImageDecodeError, load_image

_logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_name", "path", "img")
TEXT_COLUMNS = ("caption", "captions", "text", "sentences", "raw")
IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp", "bmp")
TEXT_SUFFIXES = ("txt", "caption", "text")
TRAIN_MANIFESTS = {"pretrain": "web", "caption": "clean", "retrieval": "clean", "vqa": "vqa"}
EVAL_MANIFESTS = {"caption": "test", "retrieval": "test", "vqa": "vqa_test", "pretrain": "test"}
COCO_SUBTYPES = re.compile(r"^(train|val|test)20\d\d$")

ImageFn = Callable[[Image.Image, random.Random], torch.Tensor]


class DataError(ValueError):
    """A source that cannot be used at all (not found, unknown format, no usable rows)."""


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


# --- source discovery --------------------------------------------------------------------------------------------


def _is_shards(spec: str) -> bool:
    return spec.endswith(".tar") or any(c in spec for c in "*?[")


def _expand_shards(spec: str) -> list[str]:
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    return [spec]


def resolve_sources(data: str, task: str, split: str = "", *, purpose: str = "train") -> list[str]:
    """The files a `data` spec names: comma-separated entries; a folder becomes its manifest for `task` (or
    `split`), its Karpathy file, or its tar shards."""
    sources: list[str] = []
    for entry in (e.strip() for e in data.split(",") if e.strip()):
        path = Path(entry).expanduser()
        if path.is_dir():
            sources.extend(_folder_sources(path, task, split, purpose))
        elif _is_shards(entry):
            shards = _expand_shards(entry)
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


def _folder_sources(folder: Path, task: str, split: str, purpose: str) -> list[str]:
    if "," in split:  # several manifests of one folder, e.g. "web,clean"
        return [
            s for part in split.split(",") if part.strip() for s in _folder_sources(folder, task, part.strip(), purpose)
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


# --- reading manifests -------------------------------------------------------------------------------------------


def _read_rows(path: Path, skips: SkipLog) -> list[dict[str, Any]] | dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    skips.skip("bad json", f"{path.name}:{number}")
                    continue
                if not isinstance(row, dict):
                    skips.skip("bad json", f"{path.name}:{number}")
                    continue
                rows.append(row)
        return rows
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
    raise DataError(f"{path}: unknown manifest format (expected .jsonl, .csv, .tsv, .json or .tar)")


def _first(row: dict[str, Any], preferred: str, fallbacks: tuple[str, ...]) -> Any:
    for key in (preferred, *fallbacks):
        if key in row and row[key] not in (None, ""):
            return row[key]
    return None


def _texts(value: Any) -> list[str]:
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
    """Rows `{"id", "image" (path), "captions": [...]}`, one per image, from a manifest or caption json."""
    skips = skips if skips is not None else SkipLog()
    path = Path(source)
    paths = _ImagePaths(Path(image_root) if image_root else path.parent)
    data = _read_rows(path, skips)
    images: dict[str, dict[str, Any]] = {}

    def add(key: Any, rel: Any, texts: list[str], where: str) -> None:
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

    if isinstance(data, dict) and "images" in data and any("sentences" in im for im in data["images"]):
        wanted = {split or "train"} | ({"restval"} if (split or "train") == "train" else set())
        for im in data["images"]:
            if im.get("split") not in wanted:
                continue
            rel = os.path.join(im.get("filepath", ""), im.get("filename", "")) if im.get("filename") else None
            add(im.get("id", im.get("cocoid", rel)), rel, _texts(im.get("sentences", [])), f"{path.name}:{rel}")
    elif isinstance(data, dict) and "annotations" in data and "images" in data:
        files = {im["id"]: im.get("file_name") for im in data["images"]}
        for ann in data["annotations"]:
            add(ann.get("image_id"), files.get(ann.get("image_id")), _texts(ann.get("caption")), f"ann {ann.get('id')}")
    elif isinstance(data, list):
        for number, row in enumerate(data, 1):
            if not isinstance(row, dict):
                skips.skip("bad row", f"{path.name}:{number}")
                continue
            rel = _first(row, image_column, IMAGE_COLUMNS)
            texts = _texts(_first(row, text_column, TEXT_COLUMNS))
            add(row.get("id", row.get("image_id")), rel, texts, f"{path.name}:{number}")
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
            pairs.extend(Pair(row["image"], text, image_id) for text in row["captions"])
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
            for ann in json.loads(ann_path.read_text(encoding="utf-8")).get("annotations", []):
                texts = tuple(_texts(ann.get("answers", [])))
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
        rel = _first(row, image_column, IMAGE_COLUMNS)
        image = paths(rel) if isinstance(rel, str) and rel else None
        if image is None:
            skips.skip("missing image file", f"{where} ({rel})")
            continue
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            skips.skip("empty question", where)
            continue
        human = [a.strip() for a in _texts(row.get("answers") or row.get("answer") or []) if a.strip()]
        qid = row.get("question_id", row.get("id", number - 1))
        out.append(Question(image, " ".join(question.split()), tuple(human), qid, str(row.get("answer_type", ""))))
    return out


# --- datasets ----------------------------------------------------------------------------------------------------


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The augmentation RNG of one sample: a function of (seed, epoch, index) only, so any worker count and any
    resume point see the same augmentation."""
    return random.Random(f"blip.train/{seed}/{epoch}/{index}")


class _ImageRows(Dataset):
    """Shared by the map-style datasets: keys are `(epoch, index)`; an image that fails to decode is replaced by the
    next row (and counted)."""

    def __init__(self, rows: list[Any], image_fn: ImageFn, seed: int = 0):
        if not rows:
            raise DataError("no usable rows")
        self.rows, self.image_fn, self.seed = rows, image_fn, seed
        self.skips = SkipLog()
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, key: tuple[int, int] | int) -> tuple[Any, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for attempt in range(len(self.rows)):
            i = (index + attempt) % len(self.rows)
            if i in self._bad:
                continue
            row = self.rows[i]
            try:
                image = load_image(row.image)
            except ImageDecodeError as e:
                self._bad.add(i)
                self.skips.skip("undecodable image", str(e))
                _logger.warning("skipping row %d: %s", i, e)
                continue
            return row, self.image_fn(image, sample_rng(self.seed, epoch, index))
        raise DataError("no row of this dataset has a decodable image")


class PairDataset(_ImageRows):
    """(image, caption) pairs -> `{"pixel_values": [3, S, S], "text": str, "image_id": int}`."""

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        row, pixels = self._load(key)
        return {"pixel_values": pixels, "text": row.text, "image_id": row.image_id}


class QuestionDataset(_ImageRows):
    """VQA questions -> `{"pixel_values", "question", "answers": [...], "weights": [...]}`."""

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        row, pixels = self._load(key)
        answers, weights = row.answer_weights()
        return {"pixel_values": pixels, "question": row.question, "answers": answers, "weights": weights}


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Per-rank micro-batches of `(epoch, index)` keys. Each epoch is a seeded permutation cut into global batches
    of `batch_size * world_size`; rank r takes the r-th contiguous slice of every global batch, so the global batch
    is the same for any number of processes. The last incomplete global batch is dropped. `start` skips batches
    already consumed (resume)."""

    def __init__(
        self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True
    ):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.num_batches = size // (batch_size * world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        global_batch = self.batch_size * self.world_size
        for b in range(self.start, self.num_batches):
            first = b * global_batch + self.rank * self.batch_size
            yield [(self.epoch, i) for i in order[first : first + self.batch_size]]


# --- WebDataset shards -------------------------------------------------------------------------------------------


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is everything up to the first dot of the base name, the rest is the field."""
    folder, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return os.path.join(folder, key), ext.lower()


def iter_tar_samples(path: str, skips: SkipLog | None = None) -> Iterator[dict[str, bytes]]:
    """Samples `{field: bytes, "__key__": ...}` of one tar, streamed (members of a sample are adjacent)."""
    current: dict[str, Any] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                fileobj = tar.extractfile(member)
                if fileobj is None:
                    continue
                current.setdefault("__key__", key)
                current[ext] = fileobj.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        if skips is not None:
            skips.skip("broken tar", f"{path}: {e}")
        _logger.warning("%s: stopped reading a broken tar shard (%s)", path, e)
    if current:
        yield current


def _sample_text(sample: dict[str, Any]) -> str | None:
    for ext in TEXT_SUFFIXES:
        if ext in sample:
            try:
                text = sample[ext].decode("utf-8")
            except UnicodeDecodeError:
                return None
            return " ".join(text.split()) or None
    if "json" in sample:
        try:
            row = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        texts = _texts(_first(row, "caption", TEXT_COLUMNS)) if isinstance(row, dict) else []
        return " ".join(texts[0].split()) if texts and texts[0].strip() else None
    return None


def count_tar_samples(shards: list[str]) -> list[int]:
    """Samples with an image per shard (reads the headers; used to size epochs)."""
    counts = []
    for shard in shards:
        keys = set()
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for member in tar:
                    key, ext = _split_key(member.name)
                    if member.isfile() and ext in IMAGE_SUFFIXES:
                        keys.add(key)
        except (tarfile.TarError, OSError, EOFError) as e:
            _logger.warning("%s: broken tar shard (%s)", shard, e)
        counts.append(len(keys))
    return counts


class TarPairStream(IterableDataset):
    """(image, caption) samples streamed from WebDataset shards, endlessly: shards are reshuffled each pass, and
    each process (rank x dataloader worker) keeps every n-th sample, so all ranks stream the same number of samples.
    The trainer takes `steps x batch` samples per epoch; `set_position(epoch, skip_batches)` resumes exactly.
    Samples without an image or text, or whose image does not decode, are skipped and counted."""

    def __init__(
        self,
        shards: list[str],
        image_fn: ImageFn,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if not shards:
            raise DataError("no tar shards")
        self.shards, self.image_fn, self.batch_size = list(shards), image_fn, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.skip_batches = 0, 0
        self.skips = SkipLog()

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def _raw(self, epoch: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(stream position, sample) over every shard, endlessly, reshuffled per pass."""
        position, cycle = 0, 0
        while True:
            order = list(self.shards)
            random.Random(f"blip.tar/{self.seed}/{epoch}/{cycle}").shuffle(order)
            produced = False
            for shard in order:
                for sample in iter_tar_samples(shard, self.skips):
                    produced = True
                    yield position, sample
                    position += 1
            if not produced:
                raise DataError("the tar shards hold no samples")
            cycle += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # DataLoader hands out batches round-robin from worker 0; after `skip` batches the next one must come from
        # the worker that would have made batch `skip`, so worker w plays the role of worker (w + skip) % workers.
        role = (worker + self.skip_batches) % workers
        skip_samples = len(range(role, self.skip_batches, workers)) * self.batch_size
        streams = self.world_size * workers
        mine = self.rank * workers + role
        kept = 0
        for position, sample in self._raw(self.epoch):
            if position % streams != mine:
                continue
            key = str(sample.get("__key__"))
            image_ext = next((e for e in IMAGE_SUFFIXES if e in sample), None)
            text = _sample_text(sample)
            if image_ext is None or text is None:
                self.skips.skip("no image" if image_ext is None else "empty text", key)
                continue
            try:  # decoded even when skipping on resume: a bad image must be skipped as the first pass did
                image = load_image(sample[image_ext], name=key)
            except ImageDecodeError as e:
                self.skips.skip("undecodable image", str(e))
                continue
            if kept < skip_samples:
                kept += 1
                continue
            pixels = self.image_fn(image, sample_rng(self.seed, self.epoch, position))
            kept += 1
            yield {"pixel_values": pixels, "text": text, "image_id": position}
