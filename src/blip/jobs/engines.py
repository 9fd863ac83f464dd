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
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from blip.devices import resolve_device
from blip.jobs.job import Job, RunInfo, RunSettings, pick_engine
from blip.jobs.lock import OutputBusyError, OutputLock
from blip.jobs.runner import JobError, ShardTask
from blip.jobs.sources import Row
from blip.jobs.writer import OutputDir, OutputError, Receipt, Summary

_logger = logging.getLogger(__name__)

SUMMARY_EVERY_S = 2.0  # how often the coordinator refreshes _manifest.json and errors.jsonl while running


def run_job(make_job: Callable[[str], Job], settings: RunSettings) -> Any:
    """Run (or resume) a job on the engine `settings.engine` names; returns what its kind's `finalize` returns.

    `make_job(device)` makes the job in a process that works on `device` (each torchrun rank makes its own; the Ray
    driver, which runs no rows, makes it with "cpu")."""
    engine = pick_engine(settings.engine.engine)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if engine != "torchrun" and world > 1:
        raise ValueError(
            f"launched as one of {world} torchrun processes but --engine {engine}: every process would run the "
            f"whole job; use --engine auto (or torchrun)"
        )
    if engine == "torchrun":
        return run_torchrun(make_job, settings)
    if engine == "ray":
        return run_ray(make_job("cpu"))
    return run_local(make_job(str(resolve_device(settings.device, 0))))


def _summaries(job: Job, out: OutputDir, engine: str) -> Summary:
    return out.write_summaries(len(job.shards), job.total_rows, job.kind.manifest_extra(job, engine))


def _refresher(job: Job, out: OutputDir, engine: str):
    """`refresh()`: rewrite the summaries, at most every `SUMMARY_EVERY_S` (and on the first call)."""
    last = -float("inf")

    def refresh(_: Receipt | None = None) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= SUMMARY_EVERY_S:
            last = now
            _summaries(job, out, engine)

    return refresh


def _lock(out: OutputDir) -> OutputLock:
    out.check_folder()
    return OutputLock(out.root)


def _prepare(job: Job, out: OutputDir) -> tuple[bool, list[ShardTask], int]:
    """Coordinator, holding the lock: (resuming?, the shards left to do, rows already done)."""
    resumed = out.prepare(
        job.description,
        job.fingerprint,
        overwrite=job.settings.overwrite,
        num_shards=len(job.shards),
        model_source=job.kind.model_source,
    )
    done = out.done_shards()
    pending = [s for s in job.shards if s.shard not in done]
    return resumed, pending, sum(len(s.rows) for s in job.shards if s.shard in done)


# ---------------------------------------------------------------------------------------------------------------------
# In-process


def run_local(job: Job) -> Any:
    out = job.output_dir()
    with _lock(out):
        resumed, pending, initial = _prepare(job, out)
        rows_run, started = 0, time.perf_counter()
        if pending:
            worker = job.worker(str(resolve_device(job.settings.device, 0)))
            with job.progress_bar(initial) as bar:

                def step(rows: int) -> None:
                    nonlocal rows_run
                    rows_run += rows
                    bar.update(rows)

                try:
                    worker.process(pending, progress=step, on_commit=_refresher(job, out, "local"))
                except BaseException:
                    _summaries(job, out, "local")  # what finished is on record (finalize writes them otherwise)
                    raise
                finally:
                    worker.close()
        return job.kind.finalize(job, out, RunInfo("local", resumed, rows_run, time.perf_counter() - started))


# ---------------------------------------------------------------------------------------------------------------------
# torchrun: each rank takes every world_size-th pending shard; rank 0 locks, prepares and finishes. Whatever fails
# on one rank is told to the others at the next meeting point, so no rank waits for a partner that gave up.


def run_torchrun(make_job: Callable[[str], Job], settings: RunSettings) -> Any:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        _logger.info("--engine torchrun without a torchrun launch of several processes: running in this process")
        return run_local(make_job(str(resolve_device(settings.device, 0))))
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=settings.engine.dist_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = str(resolve_device(settings.device, int(os.environ.get("LOCAL_RANK", "0"))))
    lock: OutputLock | None = None
    try:
        job, error = None, None
        try:
            job = make_job(device)
        except Exception as e:  # every rank must hear about it, or the others would wait forever
            error = f"{e}"
        views: list[Any] = [None] * world
        dist.all_gather_object(views, (job.fingerprint if job else None, error))
        errors = [f"rank {r}: {err}" if r != rank else err for r, (_, err) in enumerate(views) if err]
        if errors:
            raise JobError(errors[0] if error is None else error)
        if len({fp for fp, _ in views}) != 1:
            raise JobError("the ranks see different inputs or models (did something change while they started?)")
        assert job is not None
        out = job.output_dir()
        status: list[Any] = [None, None, False]
        failure: BaseException | None = None
        if rank == 0:
            try:
                lock = _lock(out)
                lock.acquire()
                resumed, pending, _ = _prepare(job, out)
                status = [None, [s.shard for s in pending], resumed]
            except (OutputError, OutputBusyError, OSError, ValueError) as e:
                status, failure = [str(e), None, False], e
        dist.broadcast_object_list(status, src=0)
        if failure is not None:
            raise failure
        if status[0]:
            raise JobError(status[0])
        mine = [job.shards[i] for i in status[1][rank::world]]
        engine = f"torchrun x{world}"
        rows_run, started = 0, time.perf_counter()
        try:
            if mine:
                worker = job.worker(device)
                refresh = _refresher(job, out, engine) if rank == 0 else None
                share = sum(len(s.rows) for s in mine)
                with job.progress_bar(0, total=share, show=rank == 0) as bar:
                    try:
                        worker.process(mine, progress=bar.update, on_commit=refresh)
                    finally:
                        worker.close()
                rows_run = share
        except Exception as e:
            failure = e
        outcomes: list[Any] = [None] * world
        dist.all_gather_object(outcomes, (rows_run, f"{type(failure).__name__}: {failure}" if failure else None))
        if failure is not None:
            raise failure
        failed = [f"rank {r} failed ({err})" for r, (_, err) in enumerate(outcomes) if err]
        if failed:
            raise JobError(f"{failed[0]}; finished shards are kept: rerun to resume")
        run = RunInfo(engine, bool(status[2]), sum(n for n, _ in outcomes), time.perf_counter() - started)
        result: list[Any] = [None, None]
        if rank == 0:
            try:
                result = [job.kind.finalize(job, out, run), None]
            except Exception as e:  # tell the other ranks before failing, or they would wait for the broadcast
                dist.broadcast_object_list([None, f"{type(e).__name__}: {e}"], src=0)
                raise
        dist.broadcast_object_list(result, src=0)
        if result[1]:
            raise JobError(f"rank 0 failed to finish the job: {result[1]}")
        if rank != 0:
            result[0].primary = False  # the coordinator reports
        return result[0]
    finally:
        if lock is not None:
            lock.release()
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
    """A Ray actor: loads the model(s) once, then processes the shards it is handed (same worker as every engine)."""

    def __init__(self, job: Job, threads: int, device: str):
        import torch

        torch.set_num_threads(max(1, threads))
        self.worker = job.worker(device)

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


def run_ray(job: Job) -> Any:
    out = job.output_dir()
    with _lock(out):
        return _run_ray(job, out)


def _run_ray(job: Job, out: OutputDir) -> Any:
    ray = import_ray(local=job.settings.engine.ray_address is None)
    cfg = job.settings
    options = cfg.engine
    resumed, pending, initial = _prepare(job, out)
    rows_run, started = 0, time.perf_counter()
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
                rows_run = _dispatch(ray, job, out, actors, pending, initial, engine)
            finally:
                for actor in actors:
                    ray.kill(actor)
        finally:
            if started_here:
                ray.shutdown()
    return job.kind.finalize(job, out, RunInfo(engine, resumed, rows_run, time.perf_counter() - started))


def _dispatch(
    ray: Any, job: Job, out: OutputDir, actors: list[Any], pending: list[ShardTask], initial: int, engine: str
) -> int:
    """Hands the pending shards to the actors as they free up; returns the rows they processed."""
    queue = deque(pending)
    in_flight: dict[Any, Any] = {}
    refresh = _refresher(job, out, engine)
    rows_run = 0

    def submit(actor: Any) -> None:
        if queue:
            shard = queue.popleft()
            in_flight[actor.process.remote(shard.shard, [r.to_json() for r in shard.rows])] = actor

    for actor in actors:  # two each: the next shard is queued at the actor while it works on one
        submit(actor)
        submit(actor)
    with job.progress_bar(initial) as bar:
        try:
            while in_flight:
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                actor = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:
                    raise JobError(f"a Ray worker failed: {e}") from e
                rows_run += result["rows"]
                bar.update(result["rows"])
                refresh()
                submit(actor)
        except BaseException:
            _summaries(job, out, engine)  # what finished is on record (finalize writes them otherwise)
            raise
    return rows_run
