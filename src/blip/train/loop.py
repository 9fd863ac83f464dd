"""The generic training loop: any `TrainTask` (forward(batch) -> {"loss", ...}), any `TrainData`.

Per optimizer step: `task.before_step(step)`, the learning rate for the step, `grad_accum` micro-batches (forward
under autocast — bf16 on CUDA by default, nothing on CPU — and backward, DDP gradient sync on the last one only),
optional gradient clipping, the optimizer step. Rank 0 shows a tqdm bar (the run's label, steps and an ETA), appends
the rank-averaged losses to `metrics.jsonl` every `log_every` steps and writes checkpoints (`checkpoint.pt`,
atomically) at the end of every epoch, every `ckpt_every` steps, and at the first step that ends `ckpt_every_s`
seconds after the last checkpoint (so a kill loses at most that much work, plus the step in flight). The time
interval is stretched when writing a checkpoint is slow, so that writing takes at most 1/20 of the time.

Resume is exact: the checkpoint holds the task state (model, momentum encoders, queues, temperature, draw
counter), the optimizer, the step and the position inside the epoch, and every rank's RNG states; the data order
and augmentation are functions of (seed, epoch, index). `stop_after=k` stops after step k as if the run had been
killed there (checkpoint written, run not finished); starting the same run again continues from it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from blip import distributed as D
from blip.train.optim import LRSchedule
from blip.train.rng import rng_state, set_rng_state
from blip.weights.checkpoint import FORMAT, VERSION, atomic_save, load_checkpoint

_logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
WRITE_SHARE = 20  # a time-based checkpoint waits at least this many times as long as the last write took
BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt} steps, ETA {remaining} ({rate_fmt}{postfix})"


class TrainData(Protocol):
    micro_batches_per_epoch: int

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches of `epoch`, from micro-batch `start` on."""
        ...


@dataclass
class LoopSettings:
    total_steps: int
    grad_accum: int = 1
    clip_grad: float = 0.0
    amp: str = "none"  # none, bf16, fp16
    log_every: int = 10
    ckpt_every: int = 0  # steps between checkpoints (0 = off)
    ckpt_every_s: float = 0.0  # seconds between checkpoints (0 = off)
    stop_after: int = 0
    resume: bool = True
    desc: str = "train"  # the progress bar's label
    compile: bool = False  # run the task's forward through torch.compile (the same results, faster steps on GPUs)


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    metrics: dict[str, float] = field(default_factory=dict)  # last logged values


@dataclass
class LoopResult:
    finished: bool  # all steps done (False: stopped by stop_after)
    state: LoopState
    seconds: float


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _no_buffer_sync() -> dict[str, bool]:
    """Queues and counters are identical on every rank by construction: no need to broadcast them each forward."""
    parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


class CompileUnavailable(RuntimeError):
    """`compile=true` on a platform where torch.compile cannot run."""


def compiled(module: nn.Module) -> nn.Module:
    """`module` through `torch.compile` (checkpoints keep reading the original module's state: the loop saves
    `task`, never the compiled wrapper). Raises `CompileUnavailable` with the reason where it cannot compile."""
    if not hasattr(torch, "compile"):
        raise CompileUnavailable("compile=true needs torch.compile (PyTorch 2)")
    try:
        importlib.import_module("torch._dynamo")  # fails on platforms without dynamo support
    except Exception as e:  # pragma: no cover - depends on the platform
        raise CompileUnavailable(f"compile=true: torch.compile is unavailable here ({type(e).__name__}: {e})") from e
    return torch.compile(module)


def move(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    def __init__(
        self,
        task: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: LRSchedule,
        data: TrainData,
        settings: LoopSettings,
        *,
        out_dir: str | Path,
        dist: D.DistInfo,
        describe: dict[str, Any] | None = None,
        on_checkpoint: Callable[[LoopState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if data.micro_batches_per_epoch < settings.grad_accum:
            raise ValueError(
                f"an epoch has {data.micro_batches_per_epoch} micro-batches per process, fewer than grad_accum="
                f"{settings.grad_accum}: use a smaller batch_size or more data"
            )
        self.task, self.optimizer, self.schedule, self.data, self.settings = task, optimizer, schedule, data, settings
        self.out_dir, self.dist = Path(out_dir), dist
        self.describe = describe or {}
        self.on_checkpoint = on_checkpoint
        self.state = LoopState()
        self.clock = clock
        self._last_checkpoint = clock()
        self._write_seconds = 0.0  # how long the last checkpoint took to write
        self.steps_per_epoch = data.micro_batches_per_epoch // settings.grad_accum
        self.amp_dtype = autocast_dtype(settings.amp, dist.device)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp_dtype is torch.float16)
        self.wrapped: nn.Module = task
        if dist.distributed:
            self.wrapped = nn.parallel.DistributedDataParallel(
                task, device_ids=[dist.device.index] if dist.device.type == "cuda" else None, **_no_buffer_sync()
            )
        if settings.compile:
            self.wrapped = compiled(self.wrapped)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    # --- checkpoints -------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Every rank contributes its RNG state; rank 0 writes."""
        started = self.clock()
        rngs = D.all_gather_object(rng_state())
        if not self.dist.is_main:
            D.barrier()
            self._checkpointed(started)
            return
        task = D.unwrap_model(self.task)
        task_state = {k: v for k, v in task.state_dict().items() if not k.startswith("model.")}
        ckpt = {
            "format": FORMAT,
            "version": VERSION,
            **self.describe,
            "model": task.model.state_dict(),
            "task_state": task_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.state.step,
            "epoch": self.state.epoch,
            "micro_in_epoch": self.state.micro_in_epoch,
            "world_size": self.dist.world_size,
            "rng": rngs,
            "metrics": dict(self.state.metrics),
        }
        atomic_save(ckpt, self.checkpoint_path)
        _logger.info("checkpoint at step %d -> %s", self.state.step, self.checkpoint_path)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.state)
        D.barrier()
        self._checkpointed(started)

    def _checkpointed(self, started: float) -> None:
        self._last_checkpoint = self.clock()
        self._write_seconds = self._last_checkpoint - started

    def _checkpoint_due_by_time(self) -> bool:
        """`ckpt_every_s` seconds (or 20 writes' time, if longer) since the last checkpoint, on any rank."""
        every = self.settings.ckpt_every_s
        if every <= 0:
            return False
        due = self.clock() - self._last_checkpoint >= max(every, WRITE_SHARE * self._write_seconds)
        if self.dist.distributed:  # every rank must take the same decision: save_checkpoint is collective
            due = bool(D.all_reduce_max(int(due), self.dist.device))
        return due

    def maybe_resume(self) -> bool:
        """Load `out_dir/checkpoint.pt` when resuming is on and it exists (else a fresh metrics.jsonl)."""
        if not (self.settings.resume and self.checkpoint_path.is_file()):
            if self.dist.is_main:
                (self.out_dir / METRICS).unlink(missing_ok=True)
            return False
        ckpt = load_checkpoint(self.checkpoint_path)
        task = D.unwrap_model(self.task)
        state = {f"model.{k}": v for k, v in ckpt["model"].items()}
        state.update(ckpt["task_state"])
        task.load_state_dict(state, strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = LoopState(ckpt["step"], ckpt["epoch"], ckpt["micro_in_epoch"], dict(ckpt.get("metrics", {})))
        rngs = ckpt.get("rng") or []
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            _logger.warning(
                "checkpoint written by %d processes, resuming with %d: RNG states are not restored",
                len(rngs),
                self.dist.world_size,
            )
        if self.dist.is_main:
            self._truncate_metrics(self.state.step)
            _logger.info("resumed from %s at step %d", self.checkpoint_path, self.state.step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows logged after the checkpoint (a run killed between checkpoints logs them again)."""
        path = self.out_dir / METRICS
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))

    # --- the loop ----------------------------------------------------------------------------------------------

    def _log(self, row: dict[str, Any]) -> None:
        if self.dist.is_main:
            with (self.out_dir / METRICS).open("a") as f:
                f.write(json.dumps(row) + "\n")

    def _micro_step(self, batch: dict[str, torch.Tensor], sync: bool) -> dict[str, torch.Tensor]:
        no_sync = getattr(self.wrapped, "no_sync", None)
        context = no_sync() if (not sync and no_sync is not None) else contextlib.nullcontext()
        autocast = (
            torch.autocast(self.dist.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with context:
            with autocast:
                out = self.wrapped(move(batch, self.dist.device))
            loss = out["loss"]
            if loss.device.type == "cpu" and not torch.isfinite(loss.detach()):  # free on CPU; on GPUs at log time
                raise FloatingPointError(f"non-finite loss at step {self.state.step}: {float(loss)}")
            self.scaler.scale(loss / self.settings.grad_accum).backward()
        return {k: v.detach().float() for k, v in out.items()}

    def fit(self) -> LoopResult:
        s, state = self.settings, self.state
        task = D.unwrap_model(self.task)
        task.train()
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        params = [p for p in task.parameters() if p.requires_grad]
        bar = tqdm(
            total=s.total_steps,
            initial=state.step,
            desc=s.desc,
            unit="step",
            bar_format=BAR_FORMAT,
            disable=not self.dist.is_main,
        )
        started, last_log = time.perf_counter(), time.perf_counter()
        self._last_checkpoint = self.clock()
        window: dict[str, torch.Tensor] = {}
        window_steps = 0
        try:
            while state.step < s.total_steps:
                if s.stop_after and state.step >= s.stop_after:
                    break
                batches = self.data.batches(state.epoch, state.micro_in_epoch)
                epoch_micro_batches = self.steps_per_epoch * s.grad_accum
                while state.micro_in_epoch < epoch_micro_batches:
                    task.before_step(state.step)
                    lr = self.schedule.apply(self.optimizer, state.step)
                    sums: dict[str, torch.Tensor] = {}
                    for k in range(s.grad_accum):
                        out = self._micro_step(next(batches), sync=k == s.grad_accum - 1)
                        for name, value in out.items():
                            sums[name] = sums.get(name, 0.0) + value / s.grad_accum
                    if s.clip_grad > 0:
                        self.scaler.unscale_(self.optimizer)
                        sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, s.clip_grad).detach().float()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    state.step += 1
                    state.micro_in_epoch += s.grad_accum
                    for name, value in sums.items():
                        window[name] = window.get(name, 0.0) + value
                    window_steps += 1
                    bar.update(1)
                    if state.step % s.log_every == 0 or state.step == s.total_steps:
                        now = time.perf_counter()
                        values = {k: float(D.all_reduce_mean(v / window_steps)) for k, v in sorted(window.items())}
                        if not all(math.isfinite(v) for k, v in values.items() if k.endswith("loss")):
                            raise FloatingPointError(f"non-finite loss before step {state.step}: {values}")
                        state.metrics = values
                        row = {"step": state.step, "epoch": state.epoch, "lr": lr, **values}
                        row["steps_per_s"] = window_steps / max(now - last_log, 1e-9)
                        self._log(row)
                        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}")
                        window, window_steps, last_log = {}, 0, now
                    epoch_done = state.micro_in_epoch >= epoch_micro_batches
                    if epoch_done:
                        state.epoch += 1
                        state.micro_in_epoch = 0
                    stopping = bool(s.stop_after) and state.step >= s.stop_after
                    periodic = bool(s.ckpt_every) and state.step % s.ckpt_every == 0
                    due = epoch_done or periodic or stopping or state.step == s.total_steps
                    # the clock last: with several ranks it costs a collective, not needed when saving anyway (the
                    # conditions before it are the same on every rank, so all ranks skip it together)
                    if due or self._checkpoint_due_by_time():
                        self.save_checkpoint()
                    if epoch_done or stopping or state.step >= s.total_steps:
                        break
        finally:
            bar.close()
        finished = state.step >= s.total_steps
        if not finished:
            _logger.warning("stopped after step %d of %d (stop_after); run again to resume", state.step, s.total_steps)
        return LoopResult(finished, state, time.perf_counter() - started)


def total_steps(epochs: int, steps_per_epoch: int, max_steps: int) -> int:
    """max_steps when given, else epochs x steps per epoch."""
    if steps_per_epoch < 1:
        raise ValueError("an epoch has no optimizer step: the dataset is smaller than one global batch")
    return max_steps if max_steps > 0 else epochs * steps_per_epoch
