"""CapFilt over a dataset: a synthetic caption per image from the captioner, and the filter's ITM verdict on the web
text and on every synthetic text; the texts it keeps make a new pre-training dataset (the paper, §3.3).

    from blip.capfilt import CapfiltConfig, run_capfilt
    summary = run_capfilt("runs/caption_shapes/model", "runs/retrieval_shapes/model", "runs/shapes",
                          "runs/capfilt", CapfiltConfig(num_captions=1))

The work runs on the batch-job machinery (`blip.jobs`): the input is planned into a fixed list of rows, cut into
shards, decoded ahead in threads, journaled per batch and committed atomically, so a killed run resumes where it
stopped without losing or repeating a row. Layout of the output folder::

    records-000000.jsonl   per input row, in input order: {"id", "image", "web_text", "web_score", "web_keep",
                           "synthetic": [{"text", "score", "keep"}], <the input record's other columns>}
    errors.jsonl           rows that failed (unreadable image, ...): {"image": <row id>, "error": "<reason>"}
    bootstrap.jsonl        the bootstrapped dataset: {"image": <path>, "caption", "origin": web|synthetic|clean,
                           "id"} per kept text (+ the clean split, unfiltered, with `keep_clean`); what
                           `blip train` reads (`data=<out>/bootstrap.jsonl`)
    images/                images taken out of WebDataset input shards (the dataset refers to them)
    summary.json           counts, options, and how to train on the result
    _manifest.json, _receipts/, _work/   the batch job's own bookkeeping (see `blip.jobs.writer`)

Sampling is seeded per row: the synthetic captions of a row are a pure function of (seed, row id) and the models,
never of which rows share its batch or where an earlier run was killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from blip.distributed import resolve_device
from blip.io import atomic_path, atomic_write_bytes, atomic_write_json
from blip.jobs.prefetch import Decoded, decode_key
from blip.jobs.runner import RowRunner, ShardTask, ShardWorker, split_shards
from blip.jobs.sources import (
    IMAGE_COLUMNS,
    TAR_PREFIX,
    TEXT_COLUMNS,
    InputError,
    InputOptions,
    InputPlan,
    Row,
    plan_input,
    read_bytes,
    read_image,
)
from blip.jobs.writer import OutputDir, Receipt, Throttle
from blip.models.generation import GenerationConfig
from blip.tasks.batch import row_seed as _row_seed
from blip.tasks.caption import caption_images, prompt_prefix
from blip.tasks.itm import match_probabilities
from blip.tasks.options import CaptionOptions

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)

FORMAT = "blip-capfilt/1"
RECORDS_PREFIX = "records"
DATASET = "bootstrap.jsonl"
SUMMARY = "summary.json"
IMAGES = "images"
OWN_FILES = (DATASET, SUMMARY, IMAGES)  # what CapFilt writes besides the batch job's files
ENGINES = ("auto", "local", "torchrun", "ray")
SUMMARY_EVERY_S = 2.0


@dataclass(frozen=True)
class CapfiltConfig:
    """CapFilt options. Defaults are the paper's (FACTS.md §7): nucleus sampling p=0.9 (top-k 50, repetition
    penalty 1.1) after the prompt "a picture of ", and keep a text when the filter's P(match) >= 0.5."""

    num_captions: int = 1  # synthetic captions per image
    top_p: float = 0.9  # nucleus mass
    top_k: int = 50  # sample among the k most likely tokens (0: no limit)
    threshold: float = 0.5  # keep a text when the filter's ITM P(match) >= threshold
    prompt: str = "a picture of "  # the captioner's prompt; removed from the synthetic text
    max_new_tokens: int = 20
    min_new_tokens: int = 5
    repetition_penalty: float = 1.1
    batch_size: int = 32  # rows per batch (and the models' forward batch when loaded here)
    seed: int = 0  # sampling seed: each row's captions are a function of (seed, row id)
    device: str = "cpu"  # for models loaded from a path ("auto": cuda when there is one); Blip objects stay put
    dtype: str = "float32"  # for models loaded from a path
    threads: int = 0  # torch CPU threads (0: leave as is)
    shard_size: int = 1000  # rows per output shard (the unit of commit)
    workers: int = 2  # image decoding threads
    prefetch: int = 4  # batches decoded ahead
    keep_clean: str | None = None  # human-annotated captions added unfiltered: a manifest or a shapes folder
    overwrite: bool = False  # discard earlier results in the output folder (else a rerun resumes)
    engine: str = "auto"  # auto: torchrun when launched by torchrun with several processes, else local; or ray
    ray_address: str | None = None  # ray: the cluster to join (None: a local one, or the one ray.init() joined)
    num_workers: int | None = None  # ray: actors (default: one per GPU, else one per `cpus_per_worker` CPUs)
    cpus_per_worker: float = 1.0  # ray: CPUs (and torch threads) per actor
    gpus_per_worker: float | None = None  # ray: GPUs per actor (default: 1 when the cluster has GPUs, else 0)
    tokenizer: str | None = None  # for checkpoints loaded from a path that ship no tokenizer

    def validate(self) -> None:
        for name in ("num_captions", "batch_size", "shard_size", "workers", "prefetch", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threshold != self.threshold:  # NaN
            raise ValueError("threshold must be a number (0 keeps every text, above 1 none)")
        self.captioning()  # OptionError (a ValueError) naming a bad generation option
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")

    def captioning(self) -> CaptionOptions:
        """The captioner's options (validated like every caption option): nucleus sampling after the prompt."""
        return CaptionOptions(
            prompt=self.prompt,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            do_sample=True,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            num_captions=self.num_captions,
        )

    def generation(self) -> GenerationConfig:
        return self.captioning().generation()

    def describe(self) -> dict[str, Any]:
        """The options that change the records (part of the job's fingerprint)."""
        return {
            "num_captions": self.num_captions,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "threshold": self.threshold,
            "prompt": self.prompt,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
        }


@dataclass
class CapfiltSummary:
    """What a `run_capfilt` call did (also written, with more detail, to `summary.json`)."""

    out_dir: Path
    dataset: Path | None  # bootstrap.jsonl (None until every shard is done)
    records: list[Path]  # records-*.jsonl, in input order
    errors: Path
    data: str  # the input, as planned (the manifest, folder or shard pattern)
    rows: int  # input rows
    failed: int  # rows that failed (listed in errors.jsonl)
    web_texts: int  # rows with a web text (among rows that did not fail)
    web_kept: int
    synthetic_texts: int
    synthetic_kept: int
    clean_texts: int  # human-annotated texts added unfiltered
    texts_in: int  # web texts in (= web_texts)
    texts_out: int  # rows of the bootstrapped dataset: kept web + kept synthetic + clean
    seconds: float  # this call
    rows_per_s: float  # rows processed by this call per second of processing (model loading not counted)
    resumed: bool
    complete: bool
    engine: str = "local"
    primary: bool = True  # the process that reports (torchrun rank 0)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or not self.complete else 0

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["dataset"] = str(self.dataset) if self.dataset else None
        out["records"] = [p.name for p in self.records]
        out["errors"] = self.errors.name
        return out


def row_seed(seed: int, row_id: str) -> int:
    """The sampling seed of one row: a hash of (seed, row id), stable across runs, processes and machines."""
    return _row_seed(seed, row_id, namespace="blip.capfilt")


def strip_prompt(text: str, prompt_text: str) -> str:
    """The caption without its prompt (as BLIP's `caption[len(prompt):]`, on the decoded text)."""
    if prompt_text and text.startswith(prompt_text):
        text = text[len(prompt_text) :]
    return text.strip()


def require_head(blip: Blip, task: str, role: str) -> None:
    if task not in blip.tasks:
        from blip.weights.registry import EXAMPLE_FOR_TASK

        raise ValueError(
            f"the {role} ({blip.source or 'model'}, a {blip.config.kind!r} model) has no {task!r} head: the {role} "
            f"needs {EXAMPLE_FOR_TASK[task]}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# The input


def plan_data(data: str | os.PathLike, *, limit: int | None = None, exclude: tuple[str, ...] = ()) -> InputPlan:
    """The rows of `data`: a shapes-world folder (its web split: `web.jsonl`), a folder of WebDataset .tar shards,
    a folder of images (no web texts: synthetic captions only), a .jsonl/.csv manifest with an image column and a
    text column (`caption` or `text`), or .tar shards (a path, glob or brace pattern). Every input column is kept in
    the row (`Row.extra`) and passed through to the records. `exclude`: folders a folder input leaves out."""
    spec = str(data)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "web.jsonl").is_file():
        spec = str(path / "web.jsonl")
    elif path.is_dir() and any(path.glob("*.tar")):
        spec = str(path / "*.tar")
    elif not path.exists() and not any(c in spec for c in "*?[{"):
        raise InputError(f"--data {spec}: no such file or folder")
    return plan_input(spec, "caption", InputOptions(keep_columns=True, limit=limit, exclude=exclude))


def _record_base(row: Row, kind: str) -> tuple[Any, dict[str, Any]]:
    """(the row's image as the input names it, the input's other columns to pass through)."""
    record: dict[str, Any] = {}
    if row.extra:
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(row.extra)
            record = value if isinstance(value, dict) else {}
    image_col = next((c for c in IMAGE_COLUMNS if c in record), None)
    text_col = next((c for c in TEXT_COLUMNS if c in record), None)
    image = record.get(image_col) if kind in ("jsonl", "csv") and image_col else row.id
    passed = {k: v for k, v in record.items() if k not in ("id", image_col, text_col)}
    return image, passed


# ---------------------------------------------------------------------------------------------------------------------
# The work on a batch


class CapfiltRunner(RowRunner):
    """A batch of rows -> a record per row: synthetic captions (captioner) and ITM verdicts (filter).

    Shares `RowRunner.run` (decode failures become error rows; a failing batch is retried row by row) and the
    `ShardWorker` that journals and commits shards; only the inference differs."""

    def __init__(self, captioner: Blip, filter: Blip, cfg: CapfiltConfig, input_kind: str):
        require_head(captioner, "caption", "captioner")
        require_head(filter, "itm", "filter")
        self.blip = captioner
        self.filter = filter
        self.cfg = cfg
        self.task = "capfilt"
        self.options = None
        self.generation = cfg.generation()
        self.input_kind = input_kind
        self._failed_batches = 0
        prefix = prompt_prefix(captioner, cfg.prompt)
        self.prompt_text = captioner.tokenizer.decode(prefix) if len(prefix) > 1 else ""
        sizes = {captioner.transform.image_size, filter.transform.image_size}
        self._image_size = sizes.pop() if len(sizes) == 1 else None  # both models resize the same way: do it once

    @property
    def image_size(self) -> int:
        return self.blip.transform.image_size

    def load(self, row: Row) -> Image.Image:
        return read_image(row, self._image_size)

    def error_row(self, row: Row, reason: str) -> dict[str, Any]:
        return {"image": row.id, "error": reason}

    def _infer(self, rows: list[Row], decoded: Decoded) -> list[Any]:
        cfg = self.cfg
        images = [decoded.images[decode_key(row)] for row in rows]  # per row: each row samples on its own
        device = self.blip.device
        generators = [torch.Generator(device=device).manual_seed(row_seed(cfg.seed, row.id)) for row in rows]
        captions = caption_images(
            self.blip, images, prompt=cfg.prompt, generation=self.generation, generators=generators
        )
        texts: list[str] = []
        owner: list[int] = []
        webs: list[str | None] = []
        synthetic: list[list[str]] = []
        for i, (row, caps) in enumerate(zip(rows, captions)):
            web = " ".join((row.text or "").split()) or None
            webs.append(web)
            synthetic.append([strip_prompt(c.text, self.prompt_text) for c in caps])
            for text in ([web] if web else []) + synthetic[-1]:
                texts.append(text or ".")  # an empty synthetic caption is scored as "." and never kept
                owner.append(i)
        scores = match_probabilities(self.filter, images, texts, owner) if texts else []
        out: list[dict[str, Any]] = []
        position = 0
        for row, web, synth in zip(rows, webs, synthetic):
            image, passed = _record_base(row, self.input_kind)
            record: dict[str, Any] = {"id": row.id, "image": image, "web_text": web}
            if web:
                score = scores[position]
                position += 1
                record.update(web_score=score, web_keep=score >= cfg.threshold)
            else:
                record.update(web_score=None, web_keep=False)
            record["synthetic"] = []
            for text in synth:
                score = scores[position]
                position += 1
                record["synthetic"].append(
                    {"text": text, "score": score, "keep": bool(text) and score >= cfg.threshold}
                )
            for key, value in passed.items():
                record[key if key not in record else f"input_{key}"] = value
            out.append(record)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Models


def _load(model: Blip | str | os.PathLike, cfg: CapfiltConfig, device: str) -> Blip:
    from blip.api import Blip as BlipClass

    if isinstance(model, BlipClass):
        return model
    import blip

    spec = str(model)
    return blip.load(spec, device=device, dtype=cfg.dtype, tokenizer=cfg.tokenizer, batch_size=cfg.batch_size)


def weights_fingerprint(model: Blip) -> dict[str, Any]:
    """Identifies a model by its weights (as loaded, in memory), config and vocabulary."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str).encode())
    digest.update(f"vocab:{model.tokenizer.vocab_size}".encode())
    for name, tensor in sorted(model.model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return {"sha256": digest.hexdigest(), "kind": model.config.kind}


# ---------------------------------------------------------------------------------------------------------------------
# The job


@dataclass
class _Job:
    plan: InputPlan
    shards: list[ShardTask]
    description: dict[str, Any]
    fingerprint: str

    @property
    def total_rows(self) -> int:
        return len(self.plan.rows)


def _make_job(plan: InputPlan, captioner: Blip, filter: Blip, cfg: CapfiltConfig) -> _Job:
    inputs = hashlib.sha256(plan.fingerprint().encode())
    for row in plan.rows:
        inputs.update((row.extra or "").encode() + b"\n")
    description = {
        "task": "capfilt",
        "captioner": weights_fingerprint(captioner),
        "filter": weights_fingerprint(filter),
        "dtype": {"captioner": str(captioner.dtype), "filter": str(filter.dtype)},
        "options": cfg.describe(),
        "input": {"kind": plan.kind, "rows": len(plan.rows), "fingerprint": inputs.hexdigest()},
        "output": {"format": "jsonl", "shard_size": cfg.shard_size},
    }
    fingerprint = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return _Job(plan, split_shards(plan.rows, cfg.shard_size), description, fingerprint)


def _output_dir(out_dir: Path) -> OutputDir:
    return OutputDir(out_dir, file_prefix=RECORDS_PREFIX)


def _remove_own_files(root: Path) -> None:
    for name in OWN_FILES:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _manifest_extra(job: _Job, engine: str) -> dict[str, Any]:
    return {"input_spec": job.plan.spec, "notes": job.plan.notes, "engine": engine, "capfilt": FORMAT}


def _prepare(job: _Job, out: OutputDir, cfg: CapfiltConfig, model_source: str) -> bool:
    manifest = out.read_manifest() if out.root.is_dir() else None
    if cfg.overwrite and manifest is not None and manifest.get("capfilt") == FORMAT:
        _remove_own_files(out.root)  # only in a CapFilt folder: --out pointed at a dataset must not lose its images/
    return out.prepare(
        job.description, job.fingerprint, overwrite=cfg.overwrite, num_shards=len(job.shards), model_source=model_source
    )


def _worker(captioner: Blip, filter: Blip, cfg: CapfiltConfig, job: _Job, out: OutputDir) -> ShardWorker:
    runner = CapfiltRunner(captioner, filter, cfg, job.plan.kind)
    return ShardWorker(
        runner, out, job.fingerprint, batch_size=cfg.batch_size, workers=cfg.workers, prefetch=cfg.prefetch
    )


def _progress_bar(total: int, initial: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="row",
        desc="blip capfilt",
        disable=not show,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def run_capfilt(
    captioner: Blip | str | os.PathLike,
    filter: Blip | str | os.PathLike,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: CapfiltConfig = CapfiltConfig(),
    progress: bool = True,
) -> CapfiltSummary:
    """Run (or resume) CapFilt of `data` into `out_dir`; see the module docstring for what is written.

    `captioner`: a model with a caption head (a fine-tuned captioner); `filter`: a model with an ITM head (a
    retrieval fine-tune). Each is a `blip.Blip` or anything `blip.load` reads. Raises `InputError` for an unusable
    input, `JobMismatchError` when `out_dir` holds results of other options (unless `cfg.overwrite`)."""
    started = time.perf_counter()
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    engine = cfg.engine
    if engine == "auto":
        engine = "torchrun" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "local"
    out_root = Path(out_dir).expanduser().resolve()
    plan = plan_data(data, exclude=(str(out_root),))  # an output folder inside a folder input is not input
    if cfg.keep_clean:
        _clean_sources(cfg.keep_clean)  # a bad path fails now, not after the work
    if engine == "torchrun" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_torchrun(captioner, filter, plan, out_root, cfg, progress, started)
    device = resolve_device(cfg.device) if engine != "ray" else "cpu"  # ray: the driver only fingerprints the models
    cap_model, filt_model = _load(captioner, cfg, device), _load(filter, cfg, device)
    require_head(cap_model, "caption", "captioner")
    require_head(filt_model, "itm", "filter")
    job = _make_job(plan, cap_model, filt_model, cfg)
    out = _output_dir(out_root)
    resumed = _prepare(job, out, cfg, _sources(captioner, filter))
    done = out.done_shards()
    pending = [s for s in job.shards if s.shard not in done]
    initial = sum(len(s.rows) for s in job.shards if s.shard in done)
    work_started = time.perf_counter()
    processed = 0
    if pending:
        with _progress_bar(job.total_rows, initial, progress) as bar:
            try:
                if engine == "ray":
                    processed, engine = _process_ray(captioner, filter, cfg, job, out, pending, bar)
                else:
                    processed = _process_local(cap_model, filt_model, cfg, job, out, pending, bar)
            finally:
                out.write_summaries(len(job.shards), job.total_rows, _manifest_extra(job, engine))
    work = (processed, time.perf_counter() - work_started)
    return _finalize(job, out, cfg, captioner, filter, resumed, engine, started, work)


def _process_local(
    captioner: Blip, filter: Blip, cfg: CapfiltConfig, job: _Job, out: OutputDir, pending: list[ShardTask], bar: Any
) -> int:
    throttle = Throttle(SUMMARY_EVERY_S)
    processed = 0

    def step(n: int) -> None:
        nonlocal processed
        processed += n
        bar.update(n)

    def refresh(_: Receipt | None = None) -> None:
        if throttle():
            out.write_summaries(len(job.shards), job.total_rows, _manifest_extra(job, "local"))

    _worker(captioner, filter, cfg, job, out).process(pending, progress=step, on_commit=refresh)
    return processed


def _sources(captioner: Any, filter: Any) -> str:
    def name(m: Any) -> str:
        return str(m) if isinstance(m, str | os.PathLike) else (getattr(m, "source", "") or "(in memory)")

    return f"captioner={name(captioner)} filter={name(filter)}"


# ---------------------------------------------------------------------------------------------------------------------
# Finishing: the summaries, the bootstrapped dataset


def read_records(out_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every record of a CapFilt output folder, in input order (finished shards only)."""
    for path in sorted(Path(out_dir).glob(f"{RECORDS_PREFIX}-*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def _image_for_dataset(row: Row, out_root: Path) -> str | None:
    """Where the dataset finds a row's image: its absolute path, or (for a WebDataset member) a copy taken out
    into `images/`, named relative to the output folder."""
    if row.source.startswith(TAR_PREFIX):
        target_dir = out_root / IMAGES
        data = read_bytes(row.source)
        with Image.open(io.BytesIO(data)) as im:
            ext = (im.format or "img").lower().replace("jpeg", "jpg")
        name = hashlib.sha256(row.id.encode()).hexdigest()[:16]
        target = target_dir / f"{name}.{ext}"
        if not target.exists():
            target_dir.mkdir(exist_ok=True)
            atomic_write_bytes(target, data, fsync=False)
        return f"{IMAGES}/{target.name}"
    if row.source.startswith(("http://", "https://")):
        return row.source  # kept as the input named it; the trainer reads local files only
    return row.source or None


def _clean_sources(spec: str) -> list[str]:
    """The caption manifests `keep_clean` names (a shapes folder: its clean.jsonl). Raises `DataError`."""
    from blip.data.manifests import resolve_sources

    return resolve_sources(spec, "caption", "", purpose="train")


def _clean_rows(spec: str) -> list[dict[str, Any]]:
    from blip.data.manifests import read_caption_rows

    rows = []
    for source in _clean_sources(spec):
        for entry in read_caption_rows(source):
            rows += [
                # absolute: the dataset lives in another folder, and the trainer resolves relative paths against it
                {"image": str(Path(entry["image"]).resolve()), "caption": text, "origin": "clean", "id": entry["id"]}
                for text in entry["captions"]
            ]
    return rows


def _write_dataset(job: _Job, out: OutputDir, cfg: CapfiltConfig) -> dict[str, int]:
    """bootstrap.jsonl from the records (streamed, written atomically); returns the counts."""
    counts = dict(web_texts=0, web_kept=0, synthetic_texts=0, synthetic_kept=0, clean_texts=0, texts_out=0)
    clean = _clean_rows(cfg.keep_clean) if cfg.keep_clean else []
    rows_in_order = iter(job.plan.rows)
    with atomic_path(out.root / DATASET) as tmp, open(tmp, "w", encoding="utf-8") as f:

        def write(row: dict[str, Any]) -> None:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts["texts_out"] += 1

        for record in read_records(out.root):
            row = next(r for r in rows_in_order if r.id == record["id"])  # records: the input rows minus failed ones
            counts["web_texts"] += bool(record["web_text"])
            counts["synthetic_texts"] += len(record["synthetic"])
            texts = [("web", record["web_text"])] if record["web_keep"] else []
            texts += [("synthetic", s["text"]) for s in record["synthetic"] if s["keep"]]
            counts["web_kept"] += bool(record["web_keep"])
            counts["synthetic_kept"] += len(texts) - bool(record["web_keep"])
            image = _image_for_dataset(row, out.root) if texts else None
            if image is None:
                continue
            for origin, text in texts:
                write({"image": image, "caption": text, "origin": origin, "id": row.id})
        for row in clean:
            write(row)
        counts["clean_texts"] = len(clean)
    return counts


def _how_to_train(out_root: Path) -> dict[str, str]:
    dataset = out_root / DATASET
    return {
        "dataset": str(dataset),
        "command": f"blip train --config configs/pretrain_shapes.py data={dataset} make_shapes=false "
        f"out_dir=runs/pretrain_capfilt",
        "note": "bootstrap.jsonl is a caption manifest (image path + caption per row); any `blip train` task that "
        "reads caption data takes it as data=<path>. Images are referenced where they are (WebDataset members were "
        "copied into images/), so the folder works from anywhere on this machine.",
    }


def _finalize(
    job: _Job,
    out: OutputDir,
    cfg: CapfiltConfig,
    captioner: Any,
    filter: Any,
    resumed: bool,
    engine: str,
    started: float,
    work: tuple[int, float],
) -> CapfiltSummary:
    """Coordinator, after the workers: errors.jsonl and the manifest, then (when every shard is done) the dataset
    and summary.json. `work`: (rows processed by this call, seconds spent processing them)."""
    batch = out.write_summaries(len(job.shards), job.total_rows, _manifest_extra(job, engine))
    counts = dict(web_texts=0, web_kept=0, synthetic_texts=0, synthetic_kept=0, clean_texts=0, texts_out=0)
    dataset = None
    if batch.complete:
        out.tidy()
        counts = _write_dataset(job, out, cfg)
        dataset = out.root / DATASET
    seconds = time.perf_counter() - started
    summary = CapfiltSummary(
        out_dir=out.root,
        dataset=dataset,
        records=sorted(out.root.glob(f"{RECORDS_PREFIX}-*.jsonl")),
        errors=out.root / "errors.jsonl",
        data=job.plan.spec,
        rows=job.total_rows,
        failed=batch.rows_failed,
        web_texts=counts["web_texts"],
        web_kept=counts["web_kept"],
        synthetic_texts=counts["synthetic_texts"],
        synthetic_kept=counts["synthetic_kept"],
        clean_texts=counts["clean_texts"],
        texts_in=counts["web_texts"],
        texts_out=counts["texts_out"],
        seconds=seconds,
        rows_per_s=work[0] / work[1] if work[0] and work[1] > 0 else 0.0,
        resumed=resumed,
        complete=batch.complete,
        engine=engine,
    )
    obj = {"format": FORMAT, **summary.to_json(), "models": _sources(captioner, filter)}
    obj["options"] = {**cfg.describe(), "keep_clean": cfg.keep_clean}
    obj["train"] = _how_to_train(out.root)
    atomic_write_json(out.root / SUMMARY, obj, fsync=False)
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# torchrun: every rank loads the models and takes every world_size-th pending shard; rank 0 prepares and finishes


def _run_torchrun(
    captioner: Any, filter: Any, plan: InputPlan, out_root: Path, cfg: CapfiltConfig, progress: bool, started: float
) -> CapfiltSummary:
    import datetime

    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    engine = f"torchrun x{world}"
    try:
        device = resolve_device(cfg.device, local_rank)
        cap_model, filt_model = _load(captioner, cfg, device), _load(filter, cfg, device)
        job = _make_job(plan, cap_model, filt_model, cfg)
        out = _output_dir(out_root)
        views: list[Any] = [None] * world
        dist.all_gather_object(views, job.fingerprint)
        if len(set(views)) != 1:
            raise RuntimeError("the ranks see different inputs or models (did something change while they started?)")
        status: list[Any] = [None, None, False]
        if rank == 0:
            try:
                resumed = _prepare(job, out, cfg, _sources(captioner, filter))
                done = out.done_shards()
                status = [None, [s.shard for s in job.shards if s.shard not in done], resumed]
            except (OSError, ValueError) as e:
                status = [str(e), None, False]
        dist.broadcast_object_list(status, src=0)
        if status[0]:
            raise ValueError(status[0])
        mine = [job.shards[i] for i in status[1][rank::world]]
        processed, work_started = 0, time.perf_counter()
        if mine:
            worker = _worker(cap_model, filt_model, cfg, job, out)
            with _progress_bar(sum(len(s.rows) for s in mine), 0, progress and rank == 0) as bar:
                worker.process(mine, progress=bar.update)
            processed = sum(len(s.rows) for s in mine)
        dist.barrier()
        work = (processed * world, time.perf_counter() - work_started)  # about: the shares differ by a shard at most
        result: list[Any] = [None, None]
        if rank == 0:
            try:
                result = [_finalize(job, out, cfg, captioner, filter, bool(status[2]), engine, started, work), None]
            except Exception as e:  # tell the other ranks, or they would wait for the broadcast forever
                dist.broadcast_object_list([None, f"{type(e).__name__}: {e}"], src=0)
                raise
        dist.broadcast_object_list(result, src=0)
        if result[1]:
            raise RuntimeError(f"rank 0 failed to finish the job: {result[1]}")
        summary = result[0]
        summary.primary = rank == 0
        return summary
    finally:
        if created:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Ray: a pool of actors, each with both models loaded once; shards handed out as actors free up


class _CapfiltActor:
    """A Ray actor: loads the captioner and the filter once, then processes the shards it is handed."""

    def __init__(self, captioner: Any, filter: Any, cfg: CapfiltConfig, job: _Job, out_root: str, device: str):
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        cap_model, filt_model = _load(captioner, cfg, device), _load(filter, cfg, device)
        self.worker = _worker(cap_model, filt_model, cfg, job, _output_dir(Path(out_root)))

    def process(self, shard: int, rows: list[list[Any]]) -> int:
        self.worker.process([ShardTask(shard, [Row.from_json(r) for r in rows])])
        return len(rows)


def _process_ray(
    captioner: Any, filter: Any, cfg: CapfiltConfig, job: _Job, out: OutputDir, pending: list[ShardTask], bar: Any
) -> tuple[int, str]:
    from collections import deque

    from blip.jobs.engines import import_ray, ray_workers
    from blip.jobs.runner import JobError

    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=cfg.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        count, gpus, device = ray_workers(
            ray, cfg.num_workers, cfg.cpus_per_worker, cfg.gpus_per_worker, cfg.device, len(pending)
        )
        engine = f"ray x{count}"
        slim = dataclasses.replace(job, plan=dataclasses.replace(job.plan, rows=[]), shards=[])  # rows go per shard
        actor_class = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=gpus)(_CapfiltActor)
        actors = [actor_class.remote(captioner, filter, cfg, slim, str(out.root), device) for _ in range(count)]
        queue, in_flight, processed = deque(pending), {}, 0
        throttle = Throttle(SUMMARY_EVERY_S)

        def submit(actor: Any) -> None:
            if queue:
                shard = queue.popleft()
                in_flight[actor.process.remote(shard.shard, [r.to_json() for r in shard.rows])] = actor

        try:
            for actor in actors:  # two each: the next shard waits at the actor while it works on one
                submit(actor)
                submit(actor)
            while in_flight:
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                actor = in_flight.pop(ref)
                try:
                    rows = ray.get(ref)
                except Exception as e:
                    raise JobError(f"a Ray worker failed: {e}") from e
                processed += rows
                bar.update(rows)
                if throttle():
                    out.write_summaries(len(job.shards), job.total_rows, _manifest_extra(job, engine))
                submit(actor)
        finally:
            for actor in actors:
                ray.kill(actor)
        return processed, engine
    finally:
        if started_here:
            ray.shutdown()
