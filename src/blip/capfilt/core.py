"""CapFilt over a dataset: a synthetic caption per image from the captioner, and the filter's ITM verdict on the web
text and on every synthetic text (with `itc_weight`, ITM and ITC together: `blip.capfilt.filter_score`); the texts it
keeps make a new pre-training dataset (the paper, §3.3).

    from blip.capfilt import CapfiltConfig, run_capfilt
    summary = run_capfilt("runs/caption_shapes/model", "runs/retrieval_shapes/model", "runs/shapes",
                          "runs/capfilt", CapfiltConfig(num_captions=1))

CapFilt is a job kind of the batch jobs (`CapfiltKind`, see `blip.jobs.job`): the input is planned into a fixed list
of rows, cut into shards, and run by the jobs' engines (in-process, torchrun ranks, Ray actors) — decoded ahead in
threads, journaled per batch and committed atomically, so a killed run resumes where it stopped without losing or
repeating a row; the coordinator then writes the dataset. Layout of the output folder::

    records-000000.jsonl   per input row, in input order: {"id", "image", "web_text", "web_score", "web_keep",
                           "synthetic": [{"text", "score", "keep"}], <the input record's other columns>}
    errors.jsonl           rows that failed (unreadable image, ...): {"image": <row id>, "error": "<reason>"}
    bootstrap.jsonl        the bootstrapped dataset: {"image": <path>, "caption", "origin": web|synthetic|clean,
                           "id"} per kept text (+ the clean split, unfiltered, with `keep_clean`); what
                           `blip train` reads (`data=<out>/bootstrap.jsonl`)
    images/                images taken out of WebDataset input shards (the dataset refers to them)
    summary.json           counts, options, and how to train on the result
    _manifest.json, _receipts/, _work/   the job's bookkeeping (see `blip.jobs.writer`); the manifest names every
                           file above, and --overwrite deletes only those

Sampling is seeded per row: the synthetic captions of a row are a pure function of (seed, row id) and the models,
never of which rows share its batch or where an earlier run was killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from blip.capfilt.calibrate import filter_score
from blip.io import atomic_path, atomic_write_bytes, atomic_write_json
from blip.jobs.engines import run_job
from blip.jobs.job import EngineOptions, Job, JobKind, RunInfo, RunSettings, new_job
from blip.jobs.prefetch import Decoded, decode_key
from blip.jobs.runner import RowRunner
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
    require_rows,
)
from blip.jobs.writer import ERRORS, OutputDir
from blip.tasks.batch import CaptionWork, ImageItem, PairWork, SimilarityWork, dispatch
from blip.tasks.batch import row_seed as _row_seed
from blip.tasks.caption import prompt_prefix
from blip.tasks.options import CaptionOptions

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)

__all__ = ["CapfiltConfig", "CapfiltKind", "CapfiltRunner", "CapfiltSummary", "read_records", "run_capfilt"]

SUMMARY_FORMAT = "blip-capfilt/1"  # summary.json, and the manifest's "capfilt"
RECORDS_PREFIX = "records"
DATASET = "bootstrap.jsonl"
SUMMARY = "summary.json"
IMAGES = "images"


@dataclass(frozen=True)
class CapfiltConfig:
    """CapFilt options. Defaults are the paper's (docs/training.md): nucleus sampling p=0.9 (top-k 50, repetition
    penalty 1.1) after the prompt "a picture of ", and keep a text when the filter's P(match) >= 0.5 (a threshold
    can also be chosen on validation data: `blip.capfilt.choose_threshold`)."""

    num_captions: int = 1  # synthetic captions per image
    num_beams: int = 1  # 1: nucleus sampling (the paper's choice); above 1: beam search of this width instead
    top_p: float = 0.9  # nucleus mass
    top_k: int = 50  # sample among the k most likely tokens (0: no limit)
    threshold: float = 0.5  # keep a text when the filter's score (ITM P(match), or with itc_weight ...) >= threshold
    # > 0: the score is sigma(logit P(match) + itc_weight x ITC cosine) (`blip.capfilt.filter_score`); 0: the paper's
    itc_weight: float = 0.0
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
    workers: int | None = None  # image-decoding processes (None: by CPUs and device; 0: threads in this process)
    prefetch: int = 4  # batches decoded ahead
    keep_clean: str | None = None  # human-annotated captions added unfiltered: a manifest or a shapes folder
    overwrite: bool = False  # discard earlier results in the output folder (else a rerun resumes)
    engine: str = "auto"  # auto: torchrun when launched by torchrun with several processes, else local; or ray
    ray_address: str | None = None  # ray: the cluster to join (None: a local one, or the one ray.init() joined)
    num_workers: int | None = None  # ray: actors (default: one per GPU, else one per `cpus_per_worker` CPUs)
    cpus_per_worker: float = 1.0  # ray: CPUs (and torch threads) per actor
    gpus_per_worker: float | None = None  # ray: GPUs per actor (default: 1 when the cluster has GPUs, else 0)
    dist_timeout_s: float = 24 * 3600.0  # torchrun: how long ranks wait for each other (the slowest rank's share)
    tokenizer: str | None = None  # for checkpoints loaded from a path that ship no tokenizer

    def validate(self) -> None:
        for name in ("num_captions", "batch_size", "shard_size", "prefetch", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.threshold != self.threshold:  # NaN
            raise ValueError("threshold must be a number (0 keeps every text, above 1 none)")
        if not 0 <= self.itc_weight < math.inf:
            raise ValueError(f"--itc-weight must be a number >= 0, got {self.itc_weight}")
        self.captioning()  # OptionError (a ValueError) naming a bad generation option
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        self.engine_options().validate()

    def engine_options(self) -> EngineOptions:
        return EngineOptions.of(self)

    def settings(self, out: str | os.PathLike, progress: bool | None) -> RunSettings:
        """How the job runs (`blip.jobs.job`): the options above that do not change the records."""
        return RunSettings(
            out=str(out),
            overwrite=self.overwrite,
            device=self.device,
            batch_size=self.batch_size,
            workers=self.workers,
            prefetch=self.prefetch,
            progress=progress,
            engine=self.engine_options(),
        )

    def captioning(self) -> CaptionOptions:
        """The captioner's options (validated like every caption option): nucleus sampling after the prompt, or beam
        search (`num_beams` > 1: the `num_captions` best beams; the paper's less diverse alternative)."""
        if self.num_beams > 1:
            search: dict[str, Any] = {"num_beams": self.num_beams}
        else:
            search = {"do_sample": True, "top_p": self.top_p, "top_k": self.top_k}
        return CaptionOptions(
            prompt=self.prompt,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            repetition_penalty=self.repetition_penalty,
            num_captions=self.num_captions,
            **search,
        )

    def describe(self) -> dict[str, Any]:
        """The options that change the records (part of the job's fingerprint)."""
        return {
            "num_captions": self.num_captions,
            **({"num_beams": self.num_beams} if self.num_beams > 1 else {}),  # fingerprints of sampled runs unchanged
            "top_p": self.top_p,
            "top_k": self.top_k,
            "threshold": self.threshold,
            **({"itc_weight": self.itc_weight} if self.itc_weight else {}),  # fingerprints of ITM-only runs unchanged
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
        self.options = cfg.captioning()
        self.input_kind = input_kind
        self._failed_batches = 0
        prefix = prompt_prefix(captioner, cfg.prompt)
        self.prompt_text = captioner.tokenizer.decode(prefix) if len(prefix) > 1 else ""
        sizes = {captioner.transform.image_size, filter.transform.image_size}
        self._image_size = sizes.pop() if len(sizes) == 1 else None  # both models resize the same way: do it once

    @property
    def decode_size(self) -> int | None:
        return self._image_size

    def error_row(self, row: Row, reason: str) -> dict[str, Any]:
        return {"image": row.id, "error": reason}

    def _infer(self, rows: list[Row], decoded: Decoded) -> list[Any]:
        cfg = self.cfg
        items = [ImageItem(decode_key(row), decoded.images[decode_key(row)]) for row in rows]
        # each row samples from its own generator, seeded by (seed, row id): not shared, whatever the batch
        works = [CaptionWork([item], [row_seed(cfg.seed, row.id)]) for row, item in zip(rows, items)]
        captions = dispatch(self.blip, "caption", self.options, works)
        webs: list[str | None] = []
        synthetic: list[list[str]] = []
        pairs: list[PairWork] = []
        for row, item, caps in zip(rows, items, captions):
            web = " ".join((row.text or "").split()) or None
            webs.append(web)
            synthetic.append([strip_prompt(c.text, self.prompt_text) for c in caps[0]])
            texts = [text or "." for text in ([web] if web else []) + synthetic[-1]]  # "" is scored as ".", not kept
            pairs.append(PairWork([item], texts, [0] * len(texts)))
        scores = [score for row_scores in dispatch(self.filter, "match", None, pairs) for score in row_scores]
        if cfg.itc_weight:
            works = [SimilarityWork(pair.images, pair.texts) for pair in pairs]
            cosines = [c for row_cosines in dispatch(self.filter, "similarity", None, works) for c in row_cosines[0]]
            scores = [filter_score(m, c, cfg.itc_weight) for m, c in zip(scores, cosines, strict=True)]
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


def _load(model: Blip | str | os.PathLike, cfg: CapfiltConfig, device: str) -> Blip:
    """`model` itself when it is a `Blip` (it stays where it is), else loaded on `device`."""
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
# The job kind


class CapfiltKind(JobKind):
    """CapFilt as a job kind: the rows through `CapfiltRunner` (captioner and filter), records in
    ``records-*.jsonl``; the coordinator finishes with the bootstrapped dataset and summary.json."""

    label = "blip capfilt"
    file_prefix = RECORDS_PREFIX
    extra_outputs = (DATASET, SUMMARY, IMAGES)

    def __init__(self, captioner: Blip | str | os.PathLike, filter: Blip | str | os.PathLike, cfg: CapfiltConfig):
        self.captioner = captioner
        self.filter = filter
        self.cfg = cfg
        self.model_source = _sources(captioner, filter)
        self.started = time.perf_counter()
        self._models: dict[str, tuple[Blip, Blip]] = {}  # loaded in this process, by device

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_models": {}}  # Ray actors load their own

    def models(self, device: str) -> tuple[Blip, Blip]:
        """The captioner and the filter on `device` (loaded once per process), with the heads they need."""
        if device not in self._models:
            captioner, filter = _load(self.captioner, self.cfg, device), _load(self.filter, self.cfg, device)
            require_head(captioner, "caption", "captioner")
            require_head(filter, "itm", "filter")
            self._models[device] = captioner, filter
        return self._models[device]

    def make_job(self, plan: InputPlan, settings: RunSettings, device: str) -> Job:
        """The job of `plan`'s rows; it is identified by the models' weights (loaded on `device` to hash them)."""
        captioner, filter = self.models(device)
        inputs = hashlib.sha256(plan.fingerprint().encode())
        for row in plan.rows:
            inputs.update((row.extra or "").encode() + b"\n")
        description = {
            "task": "capfilt",
            "captioner": weights_fingerprint(captioner),
            "filter": weights_fingerprint(filter),
            "dtype": {"captioner": str(captioner.dtype), "filter": str(filter.dtype)},
            "options": self.cfg.describe(),
            "input": {"kind": plan.kind, "rows": len(plan.rows), "fingerprint": inputs.hexdigest()},
            "output": {"format": "jsonl", "shard_size": self.cfg.shard_size},
        }
        return new_job(self, settings, plan, self.cfg.shard_size, description)

    def make_runner(self, job: Job, device: str) -> CapfiltRunner:
        captioner, filter = self.models(device)
        return CapfiltRunner(captioner, filter, self.cfg, job.plan.kind)

    def manifest_extra(self, job: Job, engine: str) -> dict[str, Any]:
        return {"input_spec": job.plan.spec, "notes": job.plan.notes, "engine": engine, "capfilt": SUMMARY_FORMAT}

    def finalize(self, job: Job, out: OutputDir, run: RunInfo) -> CapfiltSummary:
        """Coordinator, after the workers: errors.jsonl and the manifest, then (when every shard is done) the
        dataset and summary.json."""
        cfg = self.cfg
        batch = out.write_summaries(len(job.shards), job.total_rows, self.manifest_extra(job, run.engine))
        counts = dict(web_texts=0, web_kept=0, synthetic_texts=0, synthetic_kept=0, clean_texts=0, texts_out=0)
        dataset = None
        if batch.complete:
            out.tidy()
            counts = _write_dataset(job, out, cfg)
            dataset = out.root / DATASET
        summary = CapfiltSummary(
            out_dir=out.root,
            dataset=dataset,
            records=sorted(out.root.glob(f"{RECORDS_PREFIX}-*.jsonl")),
            errors=out.root / ERRORS,
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
            seconds=time.perf_counter() - self.started,
            rows_per_s=run.rows_run / run.work_seconds if run.rows_run and run.work_seconds > 0 else 0.0,
            resumed=run.resumed,
            complete=batch.complete,
            engine=run.engine,
        )
        obj = {"format": SUMMARY_FORMAT, **summary.to_json(), "models": self.model_source}
        obj["options"] = {**cfg.describe(), "keep_clean": cfg.keep_clean}
        obj["train"] = _how_to_train(out.root)
        atomic_write_json(out.root / SUMMARY, obj, fsync=False)
        return summary


def run_capfilt(
    captioner: Blip | str | os.PathLike,
    filter: Blip | str | os.PathLike,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: CapfiltConfig = CapfiltConfig(),
    progress: bool | None = True,
) -> CapfiltSummary:
    """Run (or resume) CapFilt of `data` into `out_dir`; see the module docstring for what is written.

    `captioner`: a model with a caption head (a fine-tuned captioner); `filter`: a model with an ITM head (a
    retrieval fine-tune). Each is a `blip.Blip` or anything `blip.load` reads. `cfg.engine` picks the engine (as
    `blip batch --engine`); `progress`: the progress bar (None: when stderr is a terminal). Raises `InputError`
    for an unusable input, `JobMismatchError` when `out_dir` holds results of other options (unless
    `cfg.overwrite`), `OutputError` for an output folder that is not CapFilt's."""
    kind = CapfiltKind(captioner, filter, cfg)
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_root = Path(out_dir).expanduser().resolve()
    plan = plan_data(data, exclude=(str(out_root),))  # an output folder inside a folder input is not input
    require_rows(plan, flag="--data")
    if cfg.keep_clean:
        _clean_sources(cfg.keep_clean)  # a bad path fails now, not after the work
    settings = cfg.settings(out_root, progress)
    return run_job(functools.partial(kind.make_job, plan, settings), settings)


def _sources(captioner: Any, filter: Any) -> str:
    def name(m: Any) -> str:
        return str(m) if isinstance(m, str | os.PathLike) else (getattr(m, "source", "") or "(in memory)")

    return f"captioner={name(captioner)} filter={name(filter)}"


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


def _write_dataset(job: Job, out: OutputDir, cfg: CapfiltConfig) -> dict[str, int]:
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
