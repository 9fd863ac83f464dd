"""A job: a fixed list of rows cut into shards, the settings it runs with, and its kind — what the rows are run
through and how the job is finished. The engines (`blip.jobs.engines`: in-process, torchrun, Ray) run any job; the
kinds are `blip batch` (`blip.jobs.batch.BatchKind`) and CapFilt (`blip.capfilt.core.CapfiltKind`).

A kind (`JobKind`) provides:

- `make_runner(job, device)`: the `RowRunner` a worker (this process, a rank, a Ray actor) runs batches with; it
  loads what it needs on `device`,
- `finalize(job, out, run)`: the coordinator's last step after every worker is done (the summaries, the embed index,
  CapFilt's dataset); what it returns is what the engine returns,
- `manifest_extra(job, engine)`: what `_manifest.json` says about the run besides the job and the shards,
- the names of its output files: `file_prefix` (shard files), `extra_outputs` (written by `finalize`), the formats.

The job's identity (`description` and its hash `fingerprint`) is the kind's to compute: it names everything that
changes the results, so a rerun resumes only the same job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blip.devices import check_device_name, resolve_device
from blip.distributed import world_info_from_env
from blip.jobs.prefetch import default_workers
from blip.jobs.runner import ShardTask, ShardWorker, split_shards
from blip.jobs.sources import InputPlan
from blip.jobs.writer import OutputDir

if TYPE_CHECKING:
    from blip.jobs.runner import RowRunner

ENGINES = ("auto", "local", "torchrun", "ray")


@dataclass(frozen=True)
class EngineOptions:
    engine: str = "auto"  # auto: torchrun when launched by torchrun with more than one process, else local
    ray_address: str | None = None  # None: a local Ray cluster (or the one ray.init() already joined); "auto": find one
    num_workers: int | None = None  # Ray actors (default: one per GPU, else one per `cpus_per_worker` CPUs)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # default: 1 when the cluster has GPUs, else 0
    dist_timeout_s: float = 24 * 3600.0  # torchrun: how long ranks wait for each other (the slowest rank's share)

    @classmethod
    def of(cls, source: Any) -> EngineOptions:
        """The engine options among `source`'s attributes: parsed flags, or a config that has these fields."""
        return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})

    def check_device(self, device: str) -> None:
        """`DeviceError` now, before any input or model is read, for a device the job cannot run on: with Ray only
        the name is checked (the actors may run on machines with GPUs this one lacks), else that this process has it."""
        if pick_engine(self.engine) == "ray":
            check_device_name(device)
        else:
            resolve_device(device, world_info_from_env()[1])

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"--num-workers must be >= 1, got {self.num_workers}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker:g}")
        if self.gpus_per_worker is not None and not self.gpus_per_worker >= 0:
            raise ValueError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker:g}")
        if not self.dist_timeout_s > 0:
            raise ValueError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout_s:g}")


@dataclass(frozen=True)
class RunSettings:
    """How a job runs: where it writes, on what, how fast. Nothing here changes its results."""

    out: str
    overwrite: bool = False  # discard the results of the job the folder's manifest names (only what it names)
    device: str = "auto"
    batch_size: int = 16  # rows per batch
    workers: int | None = None  # decode processes per worker (None: `default_workers(device)`; 0: threads)
    prefetch: int = 4  # batches decoded ahead
    progress: bool | None = None  # None: when stderr is a terminal
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass
class RunInfo:
    """What the engine tells the kind's `finalize` about this run."""

    engine: str  # "local", "torchrun x4", "ray x8"
    resumed: bool  # the folder held earlier results of this job
    rows_run: int = 0  # rows this call processed (all workers)
    work_seconds: float = 0.0  # the time spent processing them (model loading in this process not counted)


class JobKind:
    """What makes a job a batch job or CapFilt (see the module docstring). Subclasses must pickle: Ray sends the job,
    kind included, to every actor (leave loaded models out of the pickle)."""

    label: str = "blip job"  # the progress bar's
    file_prefix: str = "part"
    output_format: str = "jsonl"
    embed_format: str | None = None
    extra_outputs: tuple[str, ...] = ()
    model_source: str = ""  # the models as the user named them (for the message when they changed)

    def make_runner(self, job: Job, device: str) -> RowRunner:
        raise NotImplementedError

    def manifest_extra(self, job: Job, engine: str) -> dict[str, Any]:
        return {"engine": engine}

    def finalize(self, job: Job, out: OutputDir, run: RunInfo) -> Any:
        raise NotImplementedError


@dataclass
class Job:
    """Everything every worker of a run agrees on: the kind, the settings, the rows and shards, the job's identity."""

    kind: JobKind
    settings: RunSettings
    plan: InputPlan
    shards: list[ShardTask]
    description: dict[str, Any]
    fingerprint: str

    @property
    def total_rows(self) -> int:
        return len(self.plan.rows)

    def output_dir(self) -> OutputDir:
        kind = self.kind
        return OutputDir(
            self.settings.out,
            output_format=kind.output_format,
            embed_format=kind.embed_format,
            file_prefix=kind.file_prefix,
            extra_outputs=kind.extra_outputs,
        )

    def worker(self, device: str) -> ShardWorker:
        s = self.settings
        runner = self.kind.make_runner(self, device)
        workers = s.workers if s.workers is not None else default_workers(device)
        return ShardWorker(
            runner, self.output_dir(), self.fingerprint, batch_size=s.batch_size, workers=workers, prefetch=s.prefetch
        )

    def progress_bar(self, initial: int, total: int | None = None, *, show: bool = True):
        """tqdm over rows (rows/s and ETA); on when `progress` or stderr is a terminal, and `show`."""
        from tqdm.auto import tqdm

        progress = self.settings.progress
        enabled = show and (progress if progress is not None else sys.stderr.isatty())
        return tqdm(
            total=self.total_rows if total is None else total,
            initial=initial,
            unit="row",
            desc=self.kind.label,
            disable=not enabled,
            dynamic_ncols=True,
            smoothing=0.1,
        )


def new_job(kind: JobKind, settings: RunSettings, plan: InputPlan, shard_size: int, description: dict[str, Any]) -> Job:
    """The job of `plan`'s rows in shards of `shard_size`; its fingerprint is the hash of `description`."""
    fingerprint = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return Job(kind, settings, plan, split_shards(plan.rows, shard_size), description, fingerprint)


def pick_engine(engine: str) -> str:
    if engine != "auto":
        return engine
    return "torchrun" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "local"
