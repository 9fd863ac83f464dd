"""`blip batch`: caption, answer, match or embed every image of a folder, manifest or WebDataset, resumably.

    from blip.jobs import BatchConfig, run_batch
    result = run_batch(BatchConfig(task="caption", model="Salesforce/blip-image-captioning-base",
                                   input="photos/", out="captions/"))

The work is a fixed list of rows (`blip.jobs.sources`) cut into shards of `shard_size` rows; `BatchKind` makes it a
job (`blip.jobs.job`). Whichever engine runs it (`blip.jobs.engines`: in-process, torchrun ranks, Ray actors), every
worker uses the same `ShardWorker` (decode ahead in worker processes, the `blip.tasks` functions, journal per
batch, atomic shard commit) and one coordinator locks the output folder, merges the manifest and finishes the job. See
`blip.jobs.writer` for the output folder and how a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip.jobs.index import INDEX_KINDS, build_collection_index, current_index
from blip.jobs.job import ENGINES, EngineOptions, Job, JobKind, RunInfo, RunSettings, new_job
from blip.jobs.runner import TASKS, RowRunner, TaskOptions, make_row_runner
from blip.jobs.sources import InputOptions, require_rows
from blip.jobs.video import VideoRowRunner, check_video_job, plan_media
from blip.jobs.writer import EMBED_FORMATS, INDEX, OUTPUT_FORMATS, OutputDir, Summary, import_pyarrow
from blip.weights.fingerprint import model_fingerprint

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)

__all__ = ["ENGINES", "BatchConfig", "BatchKind", "BatchResult", "EngineOptions", "run_batch"]


@dataclass(frozen=True)
class BatchConfig:
    task: str
    model: str
    input: str
    out: str
    tokenizer: str | None = None
    output_format: str = "jsonl"
    embed_format: str = "npy"
    device: str = "auto"
    dtype: str | None = None
    batch_size: int = 16
    shard_size: int = 1000
    workers: int | None = None  # image-decoding processes per worker (None: by CPUs and device; 0: threads)
    prefetch: int = 4  # batches decoded ahead
    overwrite: bool = False
    progress: bool | None = None  # None: when stderr is a terminal
    index_type: str = "auto"  # embed: flat, ivf, hnsw, none, or auto (flat for small collections)
    inputs: InputOptions = field(default_factory=InputOptions)
    options: TaskOptions = field(default_factory=TaskOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)
    # video collections (`blip.jobs.video`): what --input holds (auto: see plan_media) and frames sampled per video
    media: str = "auto"
    num_frames: int = 8

    def validate(self) -> None:
        self.engine.check_device(self.device)
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: use one of {', '.join(TASKS)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}")
        if self.embed_format not in EMBED_FORMATS:
            raise ValueError(f"--embed-format must be one of {', '.join(EMBED_FORMATS)}")
        if self.index_type not in INDEX_KINDS:
            raise ValueError(f"--index must be one of {', '.join(INDEX_KINDS)}")
        self.engine.validate()
        for name in ("batch_size", "shard_size", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.inputs.limit is not None and self.inputs.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.inputs.limit}")
        if self.output_format == "parquet":
            import_pyarrow()
        self.options.for_task(self.task)  # OptionError (a ValueError) naming the option

    def settings(self) -> RunSettings:
        return RunSettings(
            out=self.out,
            overwrite=self.overwrite,
            device=self.device,
            batch_size=self.batch_size,
            workers=self.workers,
            prefetch=self.prefetch,
            progress=self.progress,
            engine=self.engine,
        )


@dataclass
class BatchResult:
    out: Path
    summary: Summary
    resumed: bool
    engine: str
    seconds: float = 0.0
    index: dict[str, Any] | None = None
    primary: bool = True  # the coordinator (torchrun rank 0): the one that reports

    @property
    def exit_code(self) -> int:
        return 1 if self.summary.rows_failed else 0


class BatchKind(JobKind):
    """`blip batch <task>` as a job kind: rows through `RowRunner` (the `blip.tasks` functions), shards of
    ``part-*``; embed jobs finish by building the search index."""

    def __init__(self, config: BatchConfig):
        self.config = config
        self.label = f"blip batch {config.task}"
        self.output_format = config.output_format
        self.embed_format = config.embed_format if config.task == "embed" else None
        self.extra_outputs = (INDEX,) if config.task == "embed" else ()
        self.model_source = config.model

    def make_job(self, device: str) -> Job:
        """The job of the config (`device`: where this process would work; a batch job loads nothing to plan)."""
        cfg = self.config
        cfg.validate()
        out = str(Path(cfg.out).expanduser().resolve())
        inputs = dataclasses.replace(cfg.inputs, exclude=(*cfg.inputs.exclude, out))
        plan, media = plan_media(cfg.input, cfg.task, inputs, cfg.media)
        plan = require_rows(plan, inputs, extensions_flag="--extensions")
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", None: "float32"}.get(cfg.dtype, cfg.dtype)
        output: dict[str, Any] = {"format": cfg.output_format, "shard_size": cfg.shard_size}
        if cfg.task == "embed":
            output["embed_format"] = cfg.embed_format
        description = {
            "task": cfg.task,
            "model": model_fingerprint(cfg.model, cfg.tokenizer),
            "dtype": dtype,
            "options": cfg.options.describe(cfg.task),
            "input": {"kind": plan.kind, "rows": len(plan.rows), "fingerprint": plan.fingerprint()},
            "output": output,
        }
        if media == "video":  # image jobs' descriptions (and fingerprints) stay as they were
            check_video_job(cfg.num_frames)
            description["input"].update(media="video", num_frames=cfg.num_frames)
        return new_job(self, cfg.settings(), plan, cfg.shard_size, description)

    def make_runner(self, job: Job, device: str) -> RowRunner:
        cfg = self.config
        if job.description["input"].get("media") == "video":
            return VideoRowRunner(load_blip(cfg, device), job.description["input"]["num_frames"])
        return make_row_runner(load_blip(cfg, device), cfg.task, cfg.options)

    def manifest_extra(self, job: Job, engine: str) -> dict[str, Any]:
        return {
            "input_spec": self.config.input,
            "skipped_files": job.plan.skipped_files,
            "notes": job.plan.notes,
            "engine": engine,
        }

    def finalize(self, job: Job, out: OutputDir, run: RunInfo) -> BatchResult:
        """Coordinator, after the workers: merge the manifest and errors.jsonl; build the search index for embed."""
        cfg = self.config
        extra = self.manifest_extra(job, run.engine)
        summary = out.write_summaries(len(job.shards), job.total_rows, extra)
        if summary.complete:
            out.tidy()
        index_meta = None
        if cfg.task == "embed" and summary.complete and cfg.index_type != "none":
            if summary.rows_ok == 0:
                _logger.warning("no image was embedded: no index built")
            else:
                index_meta = current_index(out.root, job.fingerprint, cfg.index_type) or build_collection_index(
                    out.root, cfg.index_type
                )
            if index_meta is not None:
                keys = ("family", "kind", "backend", "dim", "count", "vectors_per_image", "params", "media")
                extra["index"] = {k: index_meta[k] for k in keys if k in index_meta}
                summary = out.write_summaries(len(job.shards), job.total_rows, extra)
        return BatchResult(out.root, summary, run.resumed, run.engine, index=index_meta)


def load_blip(cfg: BatchConfig, device: str) -> Blip:
    import blip

    model = blip.load(cfg.model, device=device, dtype=cfg.dtype, tokenizer=cfg.tokenizer, batch_size=cfg.batch_size)
    _logger.info("loaded %s on %s (%s)", cfg.model, device, model.dtype)
    return model


def run_batch(cfg: BatchConfig) -> BatchResult:
    """Run (or resume) a batch job with the engine `cfg.engine` names."""
    from blip.jobs.engines import run_job

    started = time.perf_counter()
    result = run_job(BatchKind(cfg).make_job, cfg.settings())
    result.seconds = time.perf_counter() - started
    return result
