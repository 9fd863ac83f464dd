"""Where a batch job's rows come from: a folder of images, a CSV/JSONL manifest, or WebDataset tar shards.

`plan_input` turns `--input` into an `InputPlan`: the job's rows in a fixed order, the same on every run, rank and
machine (so shards can be split between processes and resumed). A `Row` names its image source as a string:

- a local path (absolute),
- an ``http(s)://`` URL (manifests only),
- ``tar://<abs tar path>#<offset>:<size>``: a member of a WebDataset shard, read directly at its offset.

Rows that are known to be bad while planning (a manifest line that is not JSON, no image path, no question for VQA)
carry a `problem` and fail when processed, like undecodable images do: they are reported, never dropped.
`read_image` decodes a row's image in a prefetch worker.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import itertools
import json
import logging
import os
import re
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from blip.transforms import ImageDecodeError, load_image

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
IMAGE_COLUMNS = ("image", "path", "file", "filename", "filepath", "image_path", "url", "image_url")
TEXT_COLUMNS = ("text", "caption")
QUESTION_COLUMNS = ("question",)
ID_COLUMNS = ("id",)
TAR_PREFIX = "tar://"
URL_MAX_BYTES = 32 * 1024 * 1024
URL_TIMEOUT_S = 30.0
INPUT_KINDS = ("auto", "folder", "csv", "jsonl", "webdataset")


class InputError(ValueError):
    """`--input` cannot be read as a job input (missing, unknown kind, no image column, ...)."""


class RowError(Exception):
    """A row failed: the message is the reason written to errors.jsonl."""


@dataclass(frozen=True)
class Row:
    """One unit of work: an image (and the text or question that goes with it)."""

    id: str  # the output's "image": path relative to --input, the manifest's id, or <shard>/<key>
    source: str  # local path, http(s) URL or tar://path#offset:size; "" when there is none
    text: str | None = None
    question: str | None = None
    problem: str | None = None  # known bad while planning: the reason
    extra: str | None = None  # with `InputOptions.keep_columns`: the whole input record (or .json member), as JSON

    def to_json(self) -> list[Any]:
        return [self.id, self.source, self.text, self.question, self.problem, self.extra]

    @classmethod
    def from_json(cls, value: list[Any]) -> Row:
        return cls(*value)


@dataclass(frozen=True)
class InputOptions:
    kind: str = "auto"
    image_column: str | None = None
    id_column: str | None = None
    text_column: str | None = None
    question_column: str | None = None
    root: str | None = None  # relative manifest paths are resolved against this (default: the manifest's folder)
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # folder inputs: files taken as images ("*": every file)
    questions: tuple[str, ...] = ()  # VQA: ask each of these about every image (instead of a question column)
    texts: tuple[str, ...] = ()  # match: pair every image with each of these (instead of a text column)
    limit: int | None = None  # only the first N rows
    exclude: tuple[str, ...] = ()  # folder inputs: absolute folders to leave out (the job's own --out)
    keep_columns: bool = False  # manifests / WebDataset .json members: keep each record in `Row.extra`


@dataclass
class InputPlan:
    kind: str
    spec: str
    rows: list[Row]
    skipped_files: int = 0  # folder inputs: files without an image extension
    notes: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """A hash of what the rows are (ids, texts, questions, problems; not where the files live)."""
        digest = hashlib.sha256(self.kind.encode())
        for row in self.rows:
            digest.update(json.dumps([row.id, row.text, row.question, row.problem]).encode())
            digest.update(b"\n")
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Planning


def plan_input(spec: str, task: str, options: InputOptions = InputOptions()) -> InputPlan:
    """The rows of `spec` for `task` ("caption", "vqa", "match" or "embed"), in a fixed order."""
    kind = options.kind if options.kind != "auto" else detect_kind(spec)
    if kind == "folder":
        plan = _plan_folder(spec, options)
    elif kind in ("csv", "jsonl"):
        plan = _plan_manifest(spec, kind, options, task)
    elif kind == "webdataset":
        plan = _plan_webdataset(spec, options)
    else:
        raise InputError(f"unknown input kind {kind!r}: use one of {', '.join(INPUT_KINDS)}")
    plan.rows = _expand_for_task(plan.rows, task, options)
    if options.limit is not None:
        plan.rows = plan.rows[: options.limit]
    return plan


def detect_kind(spec: str) -> str:
    lower = spec.lower()
    if lower.endswith((".tar", ".tar}")) or ("{" in spec and ".tar" in lower):
        return "webdataset"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise InputError(f"--input {spec}: no such file or folder")
    raise InputError(
        f"--input {spec}: cannot tell what this is; give a folder, a .csv/.jsonl manifest or .tar shards "
        f"(or --input-type)"
    )


def _plan_folder(spec: str, options: InputOptions) -> InputPlan:
    root = Path(spec).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"--input {spec}: not a folder")
    every_file = "*" in options.extensions
    extensions = {e.lower().lstrip(".") for e in options.extensions}
    excluded = {Path(p).resolve() for p in options.exclude}
    rows: list[Row] = []
    skipped = 0
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in excluded)
        for name in sorted(files):
            if name.startswith("."):
                continue
            if not every_file and name.rsplit(".", 1)[-1].lower() not in extensions:
                skipped += 1
                continue
            path = here / name
            rows.append(Row(id=path.relative_to(root).as_posix(), source=str(path)))
    rows.sort(key=lambda r: r.id)
    notes = [f"{skipped} files without an image extension were skipped"] if skipped else []
    if skipped:
        _logger.info(
            "%s: skipped %d files without an image extension (%s)", spec, skipped, ", ".join(sorted(extensions))
        )
    return InputPlan("folder", str(root), rows, skipped_files=skipped, notes=notes)


def _first_present(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise InputError(f"the manifest has no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    return next((c for c in defaults if c in columns), None)


def _read_manifest(path: Path, kind: str) -> tuple[list[tuple[int, dict[str, Any] | None, str | None]], list[str]]:
    """(line number, record or None, parse problem) for every record, and the column names seen."""
    records: list[tuple[int, dict[str, Any] | None, str | None]] = []
    columns: dict[str, None] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the manifest {path}: {e}") from e
    if kind == "csv":
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
        for record in reader:
            line = reader.line_num
            if None in record:  # more fields than the header names
                records.append((line, None, f"line {line}: {len(record[None])} more fields than the header has"))
                continue
            records.append((line, {k: v for k, v in record.items() if v not in (None, "")}, None))
        columns.update(dict.fromkeys(reader.fieldnames or []))
        return records, list(columns)
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            records.append((line, None, f"line {line}: not valid JSON ({e.msg})"))
            continue
        if not isinstance(record, dict):
            records.append((line, None, f"line {line}: expected a JSON object, got {type(record).__name__}"))
            continue
        columns.update(dict.fromkeys(record))
        records.append((line, record, None))
    return records, list(columns)


def _plan_manifest(spec: str, kind: str, options: InputOptions, task: str) -> InputPlan:
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"--input {spec}: no such manifest file")
    root = Path(options.root).expanduser().resolve() if options.root else path.parent
    records, columns = _read_manifest(path, kind)
    if not records:
        return InputPlan(kind, str(path), [])
    image_col = _first_present(columns, options.image_column, IMAGE_COLUMNS, "image")
    if image_col is None and columns:
        raise InputError(
            f"{spec}: no image column found (looked for {', '.join(IMAGE_COLUMNS)}; columns: {', '.join(columns)}); "
            f"name it with --image-column"
        )
    id_col = _first_present(columns, options.id_column, ID_COLUMNS, "id")
    text_col = _first_present(columns, options.text_column, TEXT_COLUMNS, "text")
    question_col = _first_present(columns, options.question_column, QUESTION_COLUMNS, "question")
    rows = []
    for line, record, problem in records:
        if record is None:
            rows.append(Row(id=f"line {line}", source="", problem=problem))
            continue
        value = record.get(image_col) if image_col else None
        row_id = str(record[id_col]) if id_col and record.get(id_col) not in (None, "") else None
        text = _text_field(record, text_col)
        question = _text_field(record, question_col)
        extra = json.dumps(record, ensure_ascii=False) if options.keep_columns else None
        if not isinstance(value, str) or not value.strip():
            rows.append(
                Row(
                    id=row_id or f"line {line}",
                    source="",
                    text=text,
                    question=question,
                    problem="no image path",
                    extra=extra,
                )
            )
            continue
        value = value.strip()
        if value.startswith(("http://", "https://")):
            source = value
        elif "://" in value:
            rows.append(
                Row(
                    id=row_id or value,
                    source="",
                    text=text,
                    question=question,
                    problem=f"unsupported URL scheme in {value!r} (http and https only)",
                    extra=extra,
                )
            )
            continue
        else:
            source = str((root / Path(value).expanduser()).resolve())
        rows.append(Row(id=row_id or value, source=source, text=text, question=question, extra=extra))
    return InputPlan(kind, str(path), rows)


def _text_field(record: dict[str, Any], column: str | None) -> str | None:
    if column is None:
        return None
    value = record.get(column)
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


# --- WebDataset ------------------------------------------------------------------------------------------------------

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as the shell (and WebDataset) does it: ``{000..009}`` (zero padding kept) and ``{a,b}``."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    ranged = _RANGE.fullmatch(match.group(0))
    if ranged:
        lo, hi = ranged.group(1), ranged.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        choices = ["{" + body + "}"]
        head, tail = pattern[: match.end()], pattern[match.end() :]
        return [head + rest for rest in expand_braces(tail)]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return list(itertools.chain.from_iterable(expand_braces(head + c + tail) for c in choices))


def shard_paths(spec: str) -> list[Path]:
    """Local tar paths named by `spec`: brace patterns, globs, or a comma-free list of either separated by spaces."""
    paths: list[Path] = []
    for part in spec.split():
        if part.startswith(("http://", "https://", "s3://", "gs://", "pipe:")):
            raise InputError(f"{part}: only local WebDataset shards are supported (download them first)")
        for expanded in expand_braces(part):
            matches = sorted(glob.glob(os.path.expanduser(expanded))) if glob.has_magic(expanded) else [expanded]
            paths += [Path(m).expanduser().resolve() for m in matches]
    if not paths:
        raise InputError(f"--input {spec}: no tar shards match")
    return paths


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name; the rest is the extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _plan_webdataset(spec: str, options: InputOptions) -> InputPlan:
    image_exts = {e.lower().lstrip(".") for e in options.extensions if e != "*"} or set(IMAGE_EXTENSIONS)
    rows: list[Row] = []
    paths = shard_paths(spec)
    for path in paths:
        shard = path.name
        if not path.is_file():
            rows.append(Row(id=shard, source="", problem=f"tar shard {path} does not exist"))
            continue
        if path.suffix.lower() != ".tar":
            rows.append(Row(id=shard, source="", problem=f"{path.name}: only uncompressed .tar shards are supported"))
            continue
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        texts: dict[str, str] = {}
        extras: dict[str, str] = {}
        problem = None
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _sample_key(member.name)
                    samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
                    if ext in ("txt", "caption", "text") and member.size < 1 << 16:
                        data = tar.extractfile(member)
                        texts[key] = data.read().decode("utf-8", "replace").strip() if data else ""
                    elif ext == "json" and options.keep_columns and member.size < 1 << 20:
                        data = tar.extractfile(member)
                        extras[key] = _json_member(data.read() if data else b"")
        except (tarfile.TarError, OSError, EOFError) as e:
            problem = f"{shard}: unreadable tar data after {len(samples)} samples ({type(e).__name__}: {e})"
        for key, members in samples.items():
            row_id = f"{shard}/{key}"
            image_ext = next((e for e in members if e in image_exts), None)
            if image_ext is None:
                found = ", ".join(sorted(members)) or "none"
                rows.append(Row(id=row_id, source="", problem=f"sample has no image member (members: {found})"))
                continue
            offset, size = members[image_ext]
            source = f"{TAR_PREFIX}{path}#{offset}:{size}"
            rows.append(Row(id=row_id, source=source, text=texts.get(key), extra=extras.get(key)))
        if problem:
            rows.append(Row(id=shard, source="", problem=problem))
    return InputPlan("webdataset", spec, rows)


def _json_member(data: bytes) -> str:
    """A sample's .json member as a JSON object string (anything else is kept under "json")."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return json.dumps({"json": data.decode("utf-8", "replace")}, ensure_ascii=False)
    return json.dumps(value if isinstance(value, dict) else {"json": value}, ensure_ascii=False)


# --- per-task expansion ----------------------------------------------------------------------------------------------


def _expand_for_task(rows: list[Row], task: str, options: InputOptions) -> list[Row]:
    """VQA: a row per (image, question); match: a row per (image, text). Missing ones are row problems."""
    if task == "vqa":
        if options.questions:
            return [Row(r.id, r.source, r.text, q, r.problem, r.extra) for r in rows for q in options.questions]
        return [r if r.problem or (r.question or "").strip() else _with_problem(r, "no question") for r in rows]
    if task == "match":
        if options.texts:
            return [Row(r.id, r.source, t, r.question, r.problem, r.extra) for r in rows for t in options.texts]
        return [r if r.problem or (r.text or "").strip() else _with_problem(r, "no text") for r in rows]
    return rows


def _with_problem(row: Row, problem: str) -> Row:
    return Row(row.id, row.source, row.text, row.question, problem, row.extra)


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_bytes(source: str) -> bytes:
    """The raw bytes of a URL or a tar member (paths are read by `load_image` itself)."""
    if source.startswith(TAR_PREFIX):
        path, _, span = source[len(TAR_PREFIX) :].rpartition("#")
        offset, size = (int(x) for x in span.split(":"))
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            raise RowError(f"cannot read tar shard {path}: {e.strerror or e}") from e
        if len(data) != size:
            raise RowError(f"truncated tar member: {len(data)} of {size} bytes present")
        return data
    if source.startswith(("http://", "https://")):
        return fetch_url(source)
    raise RowError(f"cannot read {source!r}")


def fetch_url(url: str, *, max_bytes: int = URL_MAX_BYTES, timeout_s: float = URL_TIMEOUT_S) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "blip-batch/0.1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - http(s) only, checked
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise RowError(f"cannot fetch {url}: HTTP {e.code}") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise RowError(f"cannot fetch {url}: {reason}") from e
    if len(data) > max_bytes:
        raise RowError(f"cannot fetch {url}: larger than {max_bytes} bytes")
    return data


def read_image(row: Row, image_size: int | None = None) -> Image.Image:
    """Decode a row's image to RGB (resized to the model's square input when `image_size` is given: exactly the
    resize the model's preprocessing does, done here so it runs in the prefetch workers). Raises `RowError`."""
    if row.problem:
        raise RowError(row.problem)
    if not row.source:
        raise RowError("no image")
    try:
        if row.source.startswith((TAR_PREFIX, "http://", "https://")):
            image = load_image(read_bytes(row.source), name=row.id)
        else:
            image = load_image(row.source, name=row.id)
    except ImageDecodeError as e:
        message = str(e)
        prefix = f"{row.id}: "
        raise RowError(message[len(prefix) :] if message.startswith(prefix) else message) from e
    except OSError as e:
        raise RowError(f"cannot read {row.source}: {e.strerror or e}") from e
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image
