"""The prefetch pipeline: the images of upcoming batches are read, decoded and resized while the model runs on
earlier ones, and handed over as 8-bit pixels (`blip.transforms.PreparedImage`) that only need normalising on the
model's device.

Where the decoding runs (`workers`):

- `workers >= 1`: in that many worker processes, each decoding whole batches (torch `DataLoader` workers, spawn
  context). Not threads of this process: on a GPU the decode loop is Python-bound and holds the GIL, so decode threads
  and the loop slow each other down. DataLoader workers rather than a `multiprocessing` pool because their tensors
  travel through shared memory (a batch's pixels are not pickled through a pipe), their pin-memory thread copies each
  batch into page-locked memory, they return batches in order with a bounded number in flight (`prefetch` batches,
  at least one per worker), report a worker that died, and exit by themselves when this process is killed (kill -9:
  no orphan keeps decoding). Spawn, not fork: safe with CUDA initialised and torch's threads running, and the
  children inherit no open files (the output folder's lock). The workers are started once per `Prefetcher` and kept
  for later calls (a Ray actor gets one shard per call).
- `workers = 0`: in `DECODE_THREADS` threads of this process (Pillow releases the GIL while it decodes and resizes),
  as batch jobs did before; the default on CPUs, where the model needs the cores more than decoding does.

On CUDA each batch's pixels are then copied to the GPU on a side stream one batch ahead (non-blocking, from pinned
memory), so the copy overlaps the model's work on the batch before. Either way a row gets the same pixels (the
same decode function), in the same order, with the same error when its image fails.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from PIL import Image

from blip.jobs.sources import Row, RowError, read_image
from blip.transforms import PreparedImage

_logger = logging.getLogger(__name__)

B = TypeVar("B")

DECODE_THREADS = 2  # workers=0: decode threads in this process
MAX_DEFAULT_WORKERS = 16  # ~1,200 JPEG decodes + resizes per second with 12 (measured on an H200 host's Xeon)


@dataclass
class Decoded:
    """A batch's distinct images by `decode_key`: the image (prepared 8-bit pixels, or a PIL image when decoded at
    its own size), or in `errors` the reason it failed."""

    images: dict[str, Image.Image | PreparedImage]
    errors: dict[str, str]


def decode_one(row: Row, loader: Callable[[Row], Image.Image]) -> Image.Image | str:
    """The image, or the reason it failed (any exception becomes the row's error; the job goes on)."""
    try:
        return loader(row)
    except RowError as e:
        return str(e)
    except Exception as e:  # a decoder bug on one odd file must not stop a job of millions
        _logger.debug("decoding %s failed", row.id, exc_info=True)
        return f"{type(e).__name__}: {e}"


def decode_key(row: Row) -> str:
    """Rows with the same image share one decode; a row with a problem is decoded (i.e. failed) on its own."""
    return row.source if row.source and not row.problem else f"\0{row.id}\0{row.problem}"


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(device: str | torch.device) -> int:
    """Decode processes when `--workers` is not given, from this process's share of the CPUs (a torchrun rank gets
    1/LOCAL_WORLD_SIZE of them): on a GPU all but two (the decode loop and the pin-memory thread), up to
    `MAX_DEFAULT_WORKERS`; on a CPU device none (threads in this process) below 8 cores, where the model needs them."""
    cpus = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if torch.device(device).type == "cpu":
        return 0 if cpus < 8 else min(4, cpus // 8)
    return max(1, min(MAX_DEFAULT_WORKERS, cpus - 2))


# ---------------------------------------------------------------------------------------------------------------------
# A batch's decoded images


@dataclass
class DecodedBatch:
    """A batch's distinct images, in `keys` order: decoded at the model's size into one uint8 [n, S, S, 3] tensor
    (`pixels`), or (no common size) as PIL images (`images`); and the keys that failed, with the reason."""

    keys: list[str] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    images: list[Image.Image] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def pin_memory(self) -> DecodedBatch:
        """Page-locked copy (the DataLoader's pin-memory thread calls this)."""
        return self if self.pixels is None else replace(self, pixels=self.pixels.pin_memory())

    def to(self, device: torch.device, non_blocking: bool = False) -> DecodedBatch:
        if self.pixels is None:
            return self
        return replace(self, pixels=self.pixels.to(device, non_blocking=non_blocking))

    def decoded(self) -> Decoded:
        if self.pixels is not None:
            images: dict[str, Image.Image | PreparedImage] = {
                key: PreparedImage(self.pixels, i) for i, key in enumerate(self.keys)
            }
        else:
            images = dict(zip(self.keys, self.images))
        return Decoded(images, dict(self.errors))


@dataclass(frozen=True)
class BatchDecoder:
    """A batch's rows -> `DecodedBatch`, each distinct image decoded once (`decode_key`), resized to `size` x `size`
    when given. Picklable and model-free: the DataLoader's "dataset", indexed by a batch's rows."""

    size: int | None

    def load(self, row: Row) -> Image.Image:
        return read_image(row, self.size)

    def __getitem__(self, rows: list[Row]) -> DecodedBatch:
        return self.assemble({key: decode_one(row, self.load) for key, row in first_rows(rows).items()})

    def assemble(self, results: dict[str, Image.Image | str], pin: bool = False) -> DecodedBatch:
        """The images decoded for a batch's keys (in order) as one `DecodedBatch`."""
        errors = {key: r for key, r in results.items() if isinstance(r, str)}
        good = {key: r for key, r in results.items() if not isinstance(r, str)}
        if self.size is None:
            return DecodedBatch(list(good), None, list(good.values()), errors)
        pixels = torch.empty((len(good), self.size, self.size, 3), dtype=torch.uint8, pin_memory=pin)
        target = pixels.numpy()
        for i, image in enumerate(good.values()):
            target[i] = np.asarray(image, dtype=np.uint8)
        return DecodedBatch(list(good), pixels, [], errors)


def first_rows(rows: list[Row]) -> dict[str, Row]:
    """Each distinct image's first row, in order."""
    firsts: dict[str, Row] = {}
    for row in rows:
        firsts.setdefault(decode_key(row), row)
    return firsts


def _exit_with_parent(parent: int, _worker_id: int) -> None:
    """A decode worker's init (module level: it is pickled, bound to the job's pid with `functools.partial`): exit
    within a second once the job process `parent` is gone (kill -9). DataLoader's own check of its parent runs only
    while a worker waits for work; a worker blocked handing a batch back to a dead parent would otherwise stay
    forever. The pid comes from the job, not from the worker's own `os.getppid()`: a worker still starting up when the
    job is killed would read its new parent (init) there and watch that forever."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="blip-parent-watch", daemon=True).start()


def _as_is(batch: DecodedBatch) -> DecodedBatch:  # the DataLoader's collate_fn (module level: it is pickled)
    return batch


class _Feed:
    """The DataLoader's sampler: each "index" is a batch's rows. A new source per call (the workers are kept); the
    batches handed out wait in `issued` until their decoded images come back (in the same order)."""

    def __init__(self) -> None:
        self.source: Iterator[Any] = iter(())
        self.rows_of: Callable[[Any], list[Row]] = lambda b: b
        self.issued: deque[Any] = deque()

    def __iter__(self) -> Iterator[list[Row]]:
        for batch in self.source:
            self.issued.append(batch)
            yield self.rows_of(batch)


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline


class DecodeWorkerError(RuntimeError):
    """A decode worker process died (a crash in an image library, the out-of-memory killer, ...)."""


class Prefetcher(Generic[B]):
    """Decodes the rows of upcoming batches `depth` batches ahead of the consumer: in `workers` processes, or (0) in
    `DECODE_THREADS` threads here; on CUDA the pixels are also copied to `device` one batch ahead."""

    def __init__(
        self,
        size: int | None,
        rows_of: Callable[[B], list[Row]],
        *,
        workers: int = 0,
        depth: int = 4,
        device: str | torch.device = "cpu",
        decoder: BatchDecoder | None = None,
    ):
        self.decoder = decoder if decoder is not None else BatchDecoder(size)  # a job's own (e.g. video frames)
        self.rows_of = rows_of
        self.workers = max(0, workers)
        self.depth = max(1, depth)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"  # copy each batch to the GPU one batch ahead
        self.pin = self.cuda  # decode into page-locked memory
        self._loader: Any = None
        self._feed = _Feed()

    def __call__(self, batches: Iterable[B]) -> Iterator[tuple[B, Decoded]]:
        decoded = self._processes(batches) if self.workers else self._threads(batches)
        yield from self._to_device(decoded) if self.cuda else ((b, d.decoded()) for b, d in decoded)

    def close(self) -> None:
        """Stop the worker processes (they also stop with this process)."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()

    # --- decoding ----------------------------------------------------------------------------------------------------

    def _threads(self, batches: Iterable[B]) -> Iterator[tuple[B, DecodedBatch]]:
        pending: deque[tuple[B, dict[str, Any]]] = deque()
        source = iter(batches)
        pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="blip-decode")

        def submit() -> bool:
            batch = next(source, None)
            if batch is None:
                return False
            rows = first_rows(self.rows_of(batch))
            pending.append((batch, {key: pool.submit(decode_one, row, self.decoder.load) for key, row in rows.items()}))
            return True

        try:
            while len(pending) < self.depth and submit():
                pass
            while pending:
                batch, futures = pending.popleft()
                submit()
                results = {key: future.result() for key, future in futures.items()}
                yield batch, self.decoder.assemble(results, pin=self.pin)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _processes(self, batches: Iterable[B]) -> Iterator[tuple[B, DecodedBatch]]:
        feed = self._feed
        feed.source, feed.rows_of = iter(batches), self.rows_of
        feed.issued.clear()
        finished = False
        try:
            for decoded in self._data_loader():
                yield feed.issued.popleft(), decoded
            finished = True
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise
            raise DecodeWorkerError(
                f"an image-decoding worker process died ({str(e).splitlines()[0]}); rerun to resume (--workers 0 "
                f"decodes in the job's own process; a script that starts a job needs `if __name__ == '__main__':`, "
                f"as worker processes start by importing it)"
            ) from None
        finally:
            if not finished:  # stopped mid-way: start afresh next time rather than drain the workers
                self.close()

    def _data_loader(self) -> Any:
        if self._loader is None:
            from torch.utils.data import DataLoader

            self._loader = DataLoader(
                self.decoder,  # type: ignore[arg-type]
                sampler=self._feed,  # type: ignore[arg-type]
                batch_size=None,
                collate_fn=_as_is,
                num_workers=self.workers,
                prefetch_factor=max(1, -(-self.depth // self.workers)),
                persistent_workers=True,
                pin_memory=self.pin,
                multiprocessing_context="spawn",
                worker_init_fn=functools.partial(_exit_with_parent, os.getpid()),
            )
        return self._loader

    # --- to the GPU --------------------------------------------------------------------------------------------------

    def _to_device(self, decoded: Iterator[tuple[B, DecodedBatch]]) -> Iterator[tuple[B, Decoded]]:
        """Each batch's pixels copied to the GPU on a side stream while the model works on the batch before."""
        side = torch.cuda.Stream(self.device)
        ahead: tuple[B, DecodedBatch, Any] | None = None
        for batch, images in decoded:
            with torch.cuda.stream(side):
                moved = images.to(self.device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            if ahead is not None:
                yield self._ready(*ahead)
            ahead = (batch, moved, copied)
        if ahead is not None:
            yield self._ready(*ahead)

    def _ready(self, batch: B, images: DecodedBatch, copied: Any) -> tuple[B, Decoded]:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(copied)
        if images.pixels is not None and images.pixels.is_cuda:
            images.pixels.record_stream(current)  # made on the side stream, used on this one
        return batch, images.decoded()
