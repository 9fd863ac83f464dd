"""`blip batch`: caption, answer, match or embed every image of a folder, manifest or WebDataset, resumably.

    from blip.jobs import BatchConfig, run_batch
    result = run_batch(BatchConfig(task="caption", model="Salesforce/blip-image-captioning-base",
                                   input="photos/", out="captions/"))

The work is a fixed list of rows (`blip.jobs.sources`) cut into shards of `shard_size` rows. Whichever engine runs
it (`blip.jobs.engines`: in-process, torchrun ranks, Ray actors), every worker uses the same `ShardWorker` (decode
ahead in threads, the `blip.tasks` functions, journal per batch, atomic shard commit) and one coordinator merges
the manifest. See `blip.jobs.writer` for the output folder and how a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip.distributed import check_device_name, resolve_device, world_info_from_env
from blip.jobs.index import INDEX_KINDS, build_collection_index, index_is_current
from blip.jobs.runner import TASKS, RowRunner, ShardTask, ShardWorker, TaskOptions, split_shards
from blip.jobs.sources import InputOptions, InputPlan, plan_input
from blip.jobs.writer import EMBED_FORMATS, INDEX, OUTPUT_FORMATS, OutputDir, Summary, import_pyarrow
from blip.weights.fingerprint import model_fingerprint

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)

ENGINES = ("auto", "local", "torchrun", "ray")


@dataclass(frozen=True)
class EngineOptions:
    engine: str = "auto"  # auto: torchrun when launched by torchrun with more than one process, else local
    ray_address: str | None = None  # None: a local Ray cluster (or the one ray.init() already joined); "auto": find one
    num_workers: int | None = None  # Ray actors (default: one per GPU, else one per `cpus_per_worker` CPUs)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # default: 1 when the cluster has GPUs, else 0
    dist_timeout_s: float = 24 * 3600.0  # torchrun: how long ranks wait for each other at the end


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
    workers: int = 2  # decode threads per process
    prefetch: int = 4  # batches decoded ahead
    overwrite: bool = False
    progress: bool | None = None  # None: when stderr is a terminal
    index_type: str = "auto"  # embed: flat, ivf, hnsw, none, or auto (flat for small collections)
    inputs: InputOptions = field(default_factory=InputOptions)
    options: TaskOptions = field(default_factory=TaskOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)

    def validate(self) -> None:
        if pick_engine(self.engine.engine) == "ray":
            check_device_name(self.device)  # the actors may run on machines with GPUs this one lacks
        else:
            resolve_device(self.device, world_info_from_env()[1])  # fails here, before the input or model is read
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: use one of {', '.join(TASKS)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}")
        if self.embed_format not in EMBED_FORMATS:
            raise ValueError(f"--embed-format must be one of {', '.join(EMBED_FORMATS)}")
        if self.index_type not in INDEX_KINDS:
            raise ValueError(f"--index must be one of {', '.join(INDEX_KINDS)}")
        if self.engine.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}")
        for name in ("batch_size", "shard_size", "workers", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1")
        if self.output_format == "parquet":
            import_pyarrow()
        self.options.for_task(self.task)  # OptionError (a ValueError) naming the option


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


@dataclass
class Job:
    """Everything every worker of a run agrees on: the config, the rows and shards, and the job's identity."""

    config: BatchConfig
    plan: InputPlan
    shards: list[ShardTask]
    description: dict[str, Any]
    fingerprint: str

    @property
    def total_rows(self) -> int:
        return len(self.plan.rows)

    def output_dir(self) -> OutputDir:
        cfg = self.config
        return OutputDir(
            cfg.out, output_format=cfg.output_format, embed_format=cfg.embed_format if cfg.task == "embed" else None
        )


def make_job(cfg: BatchConfig) -> Job:
    cfg.validate()
    inputs = dataclasses.replace(cfg.inputs, exclude=(*cfg.inputs.exclude, str(Path(cfg.out).expanduser().resolve())))
    plan = plan_input(cfg.input, cfg.task, inputs)
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
    fingerprint = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return Job(cfg, plan, split_shards(plan.rows, cfg.shard_size), description, fingerprint)


def load_blip(cfg: BatchConfig, device: str) -> Blip:
    import blip

    model = blip.load(cfg.model, device=device, dtype=cfg.dtype, tokenizer=cfg.tokenizer, batch_size=cfg.batch_size)
    _logger.info("loaded %s on %s (%s)", cfg.model, device, model.dtype)
    return model


def make_worker(job: Job, device: str) -> ShardWorker:
    cfg = job.config
    runner = RowRunner(load_blip(cfg, device), cfg.task, cfg.options)
    return ShardWorker(
        runner, job.output_dir(), job.fingerprint, batch_size=cfg.batch_size, workers=cfg.workers, prefetch=cfg.prefetch
    )


def progress_bar(job: Job, initial: int, total: int | None = None, *, show: bool = True):
    """tqdm over rows (rows/s and ETA); on when `--progress` or stderr is a terminal, and `show`."""
    from tqdm.auto import tqdm

    enabled = show and (job.config.progress if job.config.progress is not None else sys.stderr.isatty())
    return tqdm(
        total=job.total_rows if total is None else total,
        initial=initial,
        unit="row",
        desc=f"blip batch {job.config.task}",
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def manifest_extra(job: Job, engine: str) -> dict[str, Any]:
    """What _manifest.json says about this run besides the job and the shards."""
    return {
        "input_spec": job.config.input,
        "skipped_files": job.plan.skipped_files,
        "notes": job.plan.notes,
        "engine": engine,
    }


def finalize(job: Job, out: OutputDir, engine: str) -> tuple[Summary, dict[str, Any] | None]:
    """Coordinator, after the workers: merge the manifest and errors.jsonl; build the search index for embed."""
    cfg = job.config
    extra = manifest_extra(job, engine)
    summary = out.write_summaries(len(job.shards), job.total_rows, extra)
    if summary.complete:
        out.tidy()
    index_meta = None
    if cfg.task == "embed" and summary.complete and cfg.index_type != "none":
        if summary.rows_ok == 0:
            _logger.warning("no image was embedded: no index built")
        elif index_is_current(out.root, job.fingerprint) and cfg.index_type in ("auto", _index_kind(out.root)):
            index_meta = json.loads((out.root / INDEX / "index.json").read_text(encoding="utf-8"))
        else:
            index_meta = build_collection_index(out.root, cfg.index_type)
        if index_meta is not None:
            extra["index"] = {k: index_meta[k] for k in ("kind", "backend", "dim", "count", "params")}
            summary = out.write_summaries(len(job.shards), job.total_rows, extra)
    return summary, index_meta


def _index_kind(out: Path) -> str | None:
    try:
        return json.loads((out / INDEX / "index.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, json.JSONDecodeError):
        return None


def pick_engine(engine: str) -> str:
    if engine != "auto":
        return engine
    return "torchrun" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "local"


def run_batch(cfg: BatchConfig) -> BatchResult:
    """Run (or resume) a batch job with the engine `cfg.engine` names."""
    from blip.jobs import engines

    engine = pick_engine(cfg.engine.engine)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if engine != "torchrun" and world > 1:
        raise ValueError(
            f"launched as one of {world} torchrun processes but --engine {engine}: every process would run the "
            f"whole job; use --engine auto (or torchrun)"
        )
    started = time.perf_counter()
    if engine == "torchrun":
        result = engines.run_torchrun(cfg)
    else:
        job = make_job(cfg)
        result = engines.run_ray(job) if engine == "ray" else engines.run_local(job)
    result.seconds = time.perf_counter() - started
    return result
