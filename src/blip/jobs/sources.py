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

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from blip.data.manifests import IMAGE_COLUMNS, DataError, read_records
from blip.data.webdataset import (
    IMAGE_EXTENSIONS,
    TAR_PREFIX,
    TEXT_EXTENSIONS,
    ShardError,
    TarSample,
    expand_shards,
    iter_tar_samples,
    member_source,
    read_member,
)
from blip.fetch import FetchError, FetchLimits, SyncFetcher
from blip.transforms import ImageDecodeError, load_image

__all__ = [
    "IMAGE_COLUMNS",
    "IMAGE_EXTENSIONS",
    "INPUT_KINDS",
    "TAR_PREFIX",
    "TEXT_COLUMNS",
    "InputError",
    "InputOptions",
    "InputPlan",
    "Row",
    "RowError",
    "fetch_url",
    "plan_input",
    "read_bytes",
    "read_image",
    "require_rows",
    "shard_paths",
]

_logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "caption")  # one text per row (match), in order of preference
QUESTION_COLUMNS = ("question",)
ID_COLUMNS = ("id",)
URL_MAX_BYTES = 32 * 1024 * 1024
URL_TIMEOUT_S = 30.0  # total, per URL: connecting, redirects and the whole body
INPUT_KINDS = ("auto", "folder", "csv", "jsonl", "webdataset")


class InputError(DataError):
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
    source_b: str | None = None  # reason (NLVR2): the pair's second image, as `source` names the first

    def to_json(self) -> list[Any]:
        return [self.id, self.source, self.text, self.question, self.problem, self.extra, self.source_b]

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
    """The rows of `spec` for `task` ("caption", "vqa", "match", "embed" or "reason"), in a fixed order."""
    kind = options.kind if options.kind != "auto" else detect_kind(spec)
    if task == "reason":
        return _plan_pairs(spec, kind, options)
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


def require_rows(
    plan: InputPlan, options: InputOptions = InputOptions(), flag: str = "--input", extensions_flag: str | None = None
) -> InputPlan:
    """`plan`, or `InputError` saying what was looked for when it has no rows (a job of nothing is a mistake).
    `flag`: the option that named the input; `extensions_flag`: the one that chooses a folder's image extensions."""
    if plan.rows:
        return plan
    if plan.kind == "folder":
        extensions = (
            "every file"
            if "*" in options.extensions
            else "files ending " + ", ".join(f".{e.lstrip('.')}" for e in options.extensions)
        )
        skipped = f"; {plan.skipped_files} other files were skipped" if plan.skipped_files else ""
        hint = f", or name other extensions with {extensions_flag}" if extensions_flag else ""
        raise InputError(
            f"{flag} {plan.spec}: no images found (looked for {extensions} in the folder and its subfolders, hidden "
            f"ones left out{skipped}); check the path{hint}"
        )
    if plan.kind in ("csv", "jsonl"):
        raise InputError(f"{flag} {plan.spec}: the manifest has no rows (no record in the file)")
    raise InputError(f"{flag} {plan.spec}: the tar shards hold no samples")


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


def _plan_manifest(spec: str, kind: str, options: InputOptions, task: str) -> InputPlan:
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"--input {spec}: no such manifest file")
    root = Path(options.root).expanduser().resolve() if options.root else path.parent
    fmt = "tsv" if kind == "csv" and path.suffix.lower() == ".tsv" else kind
    try:
        manifest = read_records(path, fmt)
    except DataError as e:
        raise InputError(str(e)) from e
    records, columns = manifest.records, manifest.columns
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
    for line, record, problem in ((r.line, r.data, r.problem) for r in records):
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


# --- image pairs (reason) --------------------------------------------------------------------------------------------

PAIR_COLUMNS = ("image_a", "image_b")
STATEMENT_COLUMNS = ("statement", "sentence", "text")  # NLVR2's own files say "sentence"


def _plan_pairs(spec: str, kind: str, options: InputOptions) -> InputPlan:
    """NLVR2 rows from a manifest with image_a, image_b and statement columns: one row per line; a line without
    both images or a statement is a row problem."""
    if kind not in ("csv", "jsonl"):
        raise InputError(
            f"--input {spec}: `reason` reads a CSV/JSONL manifest with the columns image_a, image_b and statement "
            f"(one image pair per line), not a {kind}"
        )
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"--input {spec}: no such manifest file")
    root = Path(options.root).expanduser().resolve() if options.root else path.parent
    try:
        manifest = read_records(path, "tsv" if kind == "csv" and path.suffix.lower() == ".tsv" else kind)
    except DataError as e:
        raise InputError(str(e)) from e
    columns = manifest.columns
    if manifest.records and columns:
        missing = [c for c in PAIR_COLUMNS if c not in columns]
        if missing:
            raise InputError(f"{spec}: no {' and no '.join(missing)} column (columns: {', '.join(columns)})")
    text_col = _first_present(columns, options.text_column, STATEMENT_COLUMNS, "statement") if columns else None
    id_col = _first_present(columns, options.id_column, ID_COLUMNS, "id") if columns else None
    rows = []
    for line, record, problem in ((r.line, r.data, r.problem) for r in manifest.records):
        if record is None:
            rows.append(Row(id=f"line {line}", source="", problem=problem))
            continue
        values = [record.get(c) for c in PAIR_COLUMNS]
        names = [v.strip() if isinstance(v, str) else "" for v in values]
        row_id = str(record[id_col]) if id_col and record.get(id_col) not in (None, "") else f"{names[0]} | {names[1]}"
        statement = _text_field(record, text_col)
        sources: list[str | None] = []  # None where the column names no readable image
        problems = []
        for column, name in zip(PAIR_COLUMNS, names):
            if not name:
                problems.append(f"no {column}")
                sources.append(None)
            elif name.startswith(("http://", "https://")):
                sources.append(name)
            elif "://" in name:
                problems.append(f"unsupported URL scheme in {name!r} (http and https only)")
                sources.append(None)
            else:
                sources.append(str((root / Path(name).expanduser()).resolve()))
        if not (statement or "").strip():
            problems.append("no statement")
        extra = json.dumps(record, ensure_ascii=False) if options.keep_columns else None
        # a row with a problem keeps the images it names, so that its error row says which pair it was
        problem = "; ".join(problems) or None
        rows.append(Row(row_id, sources[0] or "", statement, problem=problem, extra=extra, source_b=sources[1]))
    plan = InputPlan(kind, str(path), rows)
    if options.limit is not None:
        plan.rows = plan.rows[: options.limit]
    return plan


def _text_field(record: dict[str, Any], column: str | None) -> str | None:
    if column is None:
        return None
    value = record.get(column)
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


# --- WebDataset ------------------------------------------------------------------------------------------------------


def shard_paths(spec: str) -> list[Path]:
    """Local tar paths named by `spec`: brace patterns, globs, or a comma-free list of either separated by spaces."""
    for part in spec.split():
        if part.startswith(("http://", "https://", "s3://", "gs://", "pipe:")):
            raise InputError(f"{part}: only local WebDataset shards are supported (download them first)")
    paths = [Path(p).expanduser().resolve() for p in expand_shards(spec)]
    if not paths:
        raise InputError(f"--input {spec}: no tar shards match")
    return paths


def _plan_webdataset(spec: str, options: InputOptions) -> InputPlan:
    image_exts = {e.lower().lstrip(".") for e in options.extensions if e != "*"} or set(IMAGE_EXTENSIONS)

    def wanted(ext: str, size: int) -> bool:  # read while planning: texts, and the .json member with keep_columns
        if ext in TEXT_EXTENSIONS:
            return size < 1 << 16
        return ext == "json" and options.keep_columns and size < 1 << 20

    rows: list[Row] = []
    for path in shard_paths(spec):
        shard = path.name
        if not path.is_file():
            rows.append(Row(id=shard, source="", problem=f"tar shard {path} does not exist"))
            continue
        if path.suffix.lower() != ".tar":
            rows.append(Row(id=shard, source="", problem=f"{path.name}: only uncompressed .tar shards are supported"))
            continue
        try:
            for sample in iter_tar_samples(path, read=wanted, compressed=False):
                rows.append(_sample_row(sample, path, image_exts, options))
        except ShardError as e:
            rows.append(Row(id=shard, source="", problem=str(e)))
    return InputPlan("webdataset", spec, rows)


def _sample_row(sample: TarSample, path: Path, image_exts: set[str], options: InputOptions) -> Row:
    row_id = f"{path.name}/{sample.key}"
    text_ext = sample.text_extension()
    text = sample.data[text_ext].decode("utf-8", "replace").strip() if text_ext in sample.data else None
    extra = _json_member(sample.data["json"]) if options.keep_columns and "json" in sample.data else None
    problem = sample.duplicate_problem(path.name)
    if problem:
        return Row(id=row_id, source="", text=text, problem=problem, extra=extra)
    image_ext = sample.image_extension(image_exts)
    if image_ext is None:
        found = ", ".join(sorted(sample.members)) or "none"
        return Row(id=row_id, source="", problem=f"sample has no image member (members: {found})")
    return Row(id=row_id, source=member_source(path, sample.members[image_ext]), text=text, extra=extra)


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
        try:
            return read_member(source)
        except ShardError as e:
            raise RowError(str(e)) from e
    if source.startswith(("http://", "https://")):
        return fetch_url(source)
    raise RowError(f"cannot read {source!r}")


_url_fetcher: SyncFetcher | None = None
_url_fetcher_lock = threading.Lock()


def url_fetcher() -> SyncFetcher:
    """The fetcher every job in this process reads http(s) rows with: the server's safe fetcher (no private,
    loopback or link-local addresses, also after redirects), `URL_TIMEOUT_S` in total and `URL_MAX_BYTES` per URL."""
    global _url_fetcher
    with _url_fetcher_lock:
        if _url_fetcher is None:
            limits = FetchLimits(
                max_bytes=URL_MAX_BYTES, connect_timeout_s=10.0, read_timeout_s=20.0, total_timeout_s=URL_TIMEOUT_S
            )
            _url_fetcher = SyncFetcher(limits)
        return _url_fetcher


def fetch_url(url: str) -> bytes:
    """The image bytes at `url`, or RowError with the reason (refused address, timeout, HTTP status, not an image)."""
    try:
        return url_fetcher().fetch(url, name=url)
    except FetchError as e:
        raise RowError(f"cannot fetch {e}") from e


def read_image(row: Row, image_size: int | None = None) -> Image.Image:
    """Decode a row's image to RGB (resized to the model's square input when `image_size` is given: exactly the
    resize the model's preprocessing does, done here so it runs in the prefetch workers). Raises `RowError`."""
    if row.problem:
        raise RowError(row.problem)
    if not row.source:
        raise RowError("no image")
    try:
        data = read_bytes(row.source) if row.source.startswith((TAR_PREFIX, "http://", "https://")) else row.source
        image = load_image(data, name=row.id, size=image_size)  # resized while decoding: no full-size RGB copy
    except ImageDecodeError as e:
        message = str(e)
        prefix = f"{row.id}: "
        raise RowError(message[len(prefix) :] if message.startswith(prefix) else message) from e
    except OSError as e:
        raise RowError(f"cannot read {row.source}: {e.strerror or e}") from e
    return image
