"""Who runs which shards: this process (`local`), every rank of a torchrun launch (`torchrun`), or a pool of Ray
actors (`ray`). All three give each worker the same `ShardWorker`; one coordinator (the process itself, rank 0, or
the Ray driver) prepares the output folder first and merges the manifest at the end.

Every worker writes its own shards' journals, files and receipts under ``--out``, so with torchrun across machines
or a multi-node Ray cluster, ``--out`` (like the input) must be on a filesystem every node sees.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
from collections import deque
from typing import Any

from blip.jobs.batch import (
    BatchConfig,
    BatchResult,
    Job,
    finalize,
    make_job,
    make_worker,
    manifest_extra,
    progress_bar,
    resolve_device,
)
from blip.jobs.runner import JobError, ShardTask
from blip.jobs.sources import Row
from blip.jobs.writer import JobMismatchError, OutputDir, Receipt, Throttle

_logger = logging.getLogger(__name__)

SUMMARY_EVERY_S = 2.0  # how often the coordinator refreshes _manifest.json and errors.jsonl while running


def _refresher(job: Job, out: OutputDir, engine: str):
    throttle = Throttle(SUMMARY_EVERY_S)

    def refresh(_: Receipt | None = None) -> None:
        if throttle():
            out.write_summaries(len(job.shards), job.total_rows, manifest_extra(job, engine))

    return refresh


def _prepare(job: Job, out: OutputDir) -> bool:
    cfg = job.config
    return out.prepare(
        job.description, job.fingerprint, overwrite=cfg.overwrite, num_shards=len(job.shards), model_source=cfg.model
    )


def _pending(job: Job, out: OutputDir) -> tuple[list[ShardTask], int]:
    done = out.done_shards()
    pending = [s for s in job.shards if s.shard not in done]
    return pending, sum(len(s.rows) for s in job.shards if s.shard in done)


# ---------------------------------------------------------------------------------------------------------------------
# In-process


def run_local(job: Job) -> BatchResult:
    cfg = job.config
    out = job.output_dir()
    resumed = _prepare(job, out)
    pending, initial = _pending(job, out)
    refresh = _refresher(job, out, "local")
    if pending:
        worker = make_worker(job, resolve_device(cfg.device))
        with progress_bar(job, initial) as bar:
            try:
                worker.process(pending, progress=bar.update, on_commit=refresh)
            finally:
                out.write_summaries(len(job.shards), job.total_rows, manifest_extra(job, "local"))
    summary, index = finalize(job, out, "local")
    return BatchResult(out.root, summary, resumed, "local", index=index)


# ---------------------------------------------------------------------------------------------------------------------
# torchrun: each rank takes every world_size-th pending shard; rank 0 prepares and merges


def run_torchrun(cfg: BatchConfig) -> BatchResult:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        _logger.info("--engine torchrun without a torchrun launch of several processes: running in this process")
        return run_local(make_job(cfg))
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg.engine.dist_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        job, error = None, None
        try:
            job = make_job(cfg)
        except Exception as e:  # every rank must hear about it, or the others would wait forever
            error = f"{e}"
        views: list[Any] = [None] * world
        dist.all_gather_object(views, (job.fingerprint if job else None, error))
        errors = [f"rank {r}: {err}" if r != rank else err for r, (_, err) in enumerate(views) if err]
        if errors:
            raise JobError(errors[0] if error is None else error)
        if len({fp for fp, _ in views}) != 1:
            raise JobMismatchError("the ranks see different inputs (did the input change while they started?)")
        assert job is not None
        out = job.output_dir()
        status: list[Any] = [None, None, False]
        if rank == 0:
            try:
                resumed = _prepare(job, out)
                pending, _ = _pending(job, out)
                status = [None, [s.shard for s in pending], resumed]
            except (JobMismatchError, OSError, ValueError) as e:
                status = [str(e), None, False]
        dist.broadcast_object_list(status, src=0)
        if status[0]:
            raise JobMismatchError(status[0])
        mine = [job.shards[i] for i in status[1][rank::world]]
        engine = f"torchrun x{world}"
        if mine:
            worker = make_worker(job, resolve_device(cfg.device, local_rank))
            refresh = _refresher(job, out, engine) if rank == 0 else None
            share = sum(len(s.rows) for s in mine)
            with progress_bar(job, 0, total=share, show=rank == 0) as bar:
                worker.process(mine, progress=bar.update, on_commit=refresh)
        dist.barrier()
        result: list[Any] = [None, None, None]
        if rank == 0:
            try:
                result = [*finalize(job, out, engine), None]
            except Exception as e:  # tell the other ranks before failing, or they would wait for the broadcast
                result = [None, None, f"{type(e).__name__}: {e}"]
                dist.broadcast_object_list(result, src=0)
                raise
        dist.broadcast_object_list(result, src=0)
        if result[2]:
            raise JobError(f"rank 0 failed to finish the job: {result[2]}")
        return BatchResult(out.root, result[0], bool(status[2]), engine, index=result[1], primary=rank == 0)
    finally:
        if created:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Ray: a pool of actors, each with the model loaded once; shards handed out as actors free up


def ray_workers(
    ray: Any, num_workers: int, cpus_per_worker: float, gpus_per_worker: float | None, device: str, shards: int
) -> tuple[int, float, str]:
    """How many actors to start (at most one per shard), GPUs per actor, and the device they run on, from the
    cluster's resources: one actor per GPU when there are GPUs and the device allows them, else per CPU share."""
    resources = ray.cluster_resources()
    gpus = gpus_per_worker
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 and device in ("auto", "cuda") else 0.0
    if num_workers:
        count = num_workers
    elif gpus:
        count = int(resources.get("GPU", 0) // gpus)
    else:
        count = int(resources.get("CPU", 1) // max(cpus_per_worker, 1e-9))
    return max(1, min(count, shards)), gpus, "cuda" if gpus else ("cpu" if device == "auto" else device)


def import_ray(local: bool = False) -> Any:
    """Ray; `local`: for a new local cluster, whose token authentication we choose before Ray reads its settings
    (left unset, Ray chooses the same and logs a WARNING saying so)."""
    if local and "ray" not in sys.modules and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        import ray
    except ImportError as e:
        raise JobError("--engine ray needs Ray: pip install 'blip-vl[scale]' (or pip install ray)") from e
    return ray


class ShardActor:
    """A Ray actor: loads the model once, then processes the shards it is handed (same worker as every engine)."""

    def __init__(self, job: Job, threads: int, device: str):
        import torch

        torch.set_num_threads(max(1, threads))
        self.worker = make_worker(job, device)

    def process(self, shard: int, rows: list[list[Any]]) -> dict[str, Any]:
        task = ShardTask(shard, [Row.from_json(r) for r in rows])
        receipts = self.worker.process([task])
        failed = sum(len(r.errors) for r in receipts)
        return {"shard": shard, "rows": len(rows), "failed": failed}

    def ready(self) -> bool:
        return True


def _slim(job: Job) -> Job:
    """The job without its rows (actors get each shard's rows with the shard)."""
    plan = dataclasses.replace(job.plan, rows=[])
    return dataclasses.replace(job, plan=plan, shards=[])


def run_ray(job: Job) -> BatchResult:
    ray = import_ray(local=job.config.engine.ray_address is None)
    cfg = job.config
    options = cfg.engine
    out = job.output_dir()
    resumed = _prepare(job, out)
    pending, initial = _pending(job, out)
    started_here = False
    engine = "ray"
    if pending:
        if not ray.is_initialized():
            ray.init(address=options.ray_address, include_dashboard=False, logging_level=logging.WARNING)
            started_here = True
        try:
            count, gpus, device = ray_workers(
                ray, options.num_workers, options.cpus_per_worker, options.gpus_per_worker, cfg.device, len(pending)
            )
            engine = f"ray x{count}"
            _logger.info(
                "ray: %d actors (%s CPU, %s GPU each) for %d shards", count, options.cpus_per_worker, gpus, len(pending)
            )
            actor_class = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=gpus)(ShardActor)
            slim = _slim(job)
            threads = max(1, int(options.cpus_per_worker))
            actors = [actor_class.remote(slim, threads, device) for _ in range(count)]
            try:
                _dispatch(ray, job, out, actors, pending, initial, engine)
            finally:
                for actor in actors:
                    ray.kill(actor)
        finally:
            if started_here:
                ray.shutdown()
    summary, index = finalize(job, out, engine)
    return BatchResult(out.root, summary, resumed, engine, index=index)


def _dispatch(
    ray: Any, job: Job, out: OutputDir, actors: list[Any], pending: list[ShardTask], initial: int, engine: str
) -> None:
    queue = deque(pending)
    in_flight: dict[Any, Any] = {}
    refresh = _refresher(job, out, engine)

    def submit(actor: Any) -> None:
        if queue:
            shard = queue.popleft()
            in_flight[actor.process.remote(shard.shard, [r.to_json() for r in shard.rows])] = actor

    for actor in actors:  # two each: the next shard is queued at the actor while it works on one
        submit(actor)
        submit(actor)
    with progress_bar(job, initial) as bar:
        try:
            while in_flight:
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                actor = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:
                    raise JobError(f"a Ray worker failed: {e}") from e
                bar.update(result["rows"])
                refresh()
                submit(actor)
        finally:
            out.write_summaries(len(job.shards), job.total_rows, manifest_extra(job, engine))
