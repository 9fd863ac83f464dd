"""Dynamic micro-batching: requests from concurrent clients that ask the same model for the same thing (same task,
same generation settings) are merged into one model call.

- Admission is bounded: `admit()` hands out at most `queue_size` slots (a slot covers a request from before its
  images are fetched until its answer is ready), so a full server answers 503 at once instead of piling up images.
- One inference thread runs the batches, one at a time (a CPU or a GPU is best used by one big call at once).
- The first request of a batch waits at most `max_wait_ms` for others with the same key, up to `max_batch` rows;
  one larger than `max_batch` runs alone, never split. While other admitted requests are still being prepared (images
  fetched and decoded), it waits for them up to `PREPARING_WAIT_FACTOR` times as long, so a burst of arrivals makes
  one batch. It does not wait at all when it is the only request in the server and the previous batch was a single
  request too (a lone client pays no batching delay).
- Queued work whose caller stopped waiting (timeout) is dropped if its batch has not started.
- If a merged batch fails, each of its requests is retried alone, so one bad request cannot fail its neighbours.
- `close()` stops admitting, lets the queued work finish, and stops the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

_logger = logging.getLogger(__name__)

# runner(key, payloads) -> one result per payload, in order; runs on the inference thread
Runner = Callable[[Hashable, list[Any]], list[Any]]
BatchObserver = Callable[[Hashable, int, int, float], None]  # (key, rows, requests, seconds)


PREPARING_WAIT_FACTOR = 4


class QueueFull(Exception):
    """No slot left: the caller should answer 503 with Retry-After."""


class BatcherClosed(Exception):
    """The batcher is shutting down (or not started) and takes no new work."""


@dataclass(eq=False)
class QueuedWork:
    """One request's payload waiting for the model: its batch key, its rows, and the future its caller awaits."""

    key: Hashable
    payload: Any
    rows: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)


class Slot:
    """An admission slot; release it (or use it as a context manager) when the request is done."""

    def __init__(self, batcher: MicroBatcher):
        self._batcher = batcher
        self._released = False
        self.submitted = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._batcher._release(self)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled by a timeout meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class MicroBatcher:
    def __init__(
        self,
        runner: Runner,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        queue_size: int = 64,
        on_batch: BatchObserver | None = None,
        name: str = "blip-inference",
    ):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be >= 1 and max_wait_ms >= 0")
        self.runner = runner
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.on_batch = on_batch
        self.name = name
        self._cond = threading.Condition()
        self._pending: deque[QueuedWork] = deque()
        self._admitted = 0
        self._preparing = 0  # admitted, not yet submitted
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last_requests = 0  # requests in the previous batch

    # --- state ---------------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    @property
    def admitted(self) -> int:
        """Requests holding a slot (being prepared, queued or running)."""
        return self._admitted

    @property
    def depth(self) -> int:
        """Requests queued for the model, not yet running."""
        return len(self._pending)

    # --- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._closing = False
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Take no new work, finish what is queued, stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                _logger.warning("inference thread still busy after %.1f s at shutdown", timeout or 0.0)

    # --- client side (event loop) --------------------------------------------------------------------------------

    def admit(self) -> Slot:
        with self._cond:
            if self._closing or self._thread is None:
                raise BatcherClosed("the server is not accepting work (starting or shutting down)")
            if self._admitted >= self.queue_size:
                raise QueueFull(f"the server is busy: {self._admitted} requests in progress (limit {self.queue_size})")
            self._admitted += 1
            self._preparing += 1
        return Slot(self)

    def _release(self, slot: Slot) -> None:
        with self._cond:
            self._admitted -= 1
            if not slot.submitted:
                self._preparing -= 1
            self._cond.notify_all()

    async def submit(self, key: Hashable, payload: Any, rows: int, slot: Slot | None = None) -> Any:
        """Queue the work of the request holding `slot` and wait for its result (cancel the await to give up)."""
        loop = asyncio.get_running_loop()
        queued = QueuedWork(key, payload, max(1, rows), loop.create_future(), loop)
        with self._cond:
            if self._closing or self._thread is None:
                raise BatcherClosed("the server is not accepting work (shutting down)")
            if slot is not None and not slot.submitted:
                slot.submitted = True
                self._preparing -= 1
            self._pending.append(queued)
            self._cond.notify_all()
        return await queued.future

    # --- inference thread ----------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _rows_for(self, key: Hashable) -> int:
        return sum(queued.rows for queued in self._pending if queued.key == key)

    def _next_batch(self) -> list[QueuedWork] | None:
        with self._cond:
            while True:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return None  # closing and drained
                first = self._pending[0]
                if first.future.cancelled():
                    self._pending.popleft()
                    continue
                lonely = self._admitted == 1 and self._last_requests <= 1
                while not self._closing and self._rows_for(first.key) < self.max_batch:
                    if self._preparing > 0:
                        wait = self.max_wait * PREPARING_WAIT_FACTOR
                    else:
                        wait = 0.0 if lonely else self.max_wait
                    remaining = first.enqueued + wait - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch = self._take(first.key)
                self._last_requests = len(batch)
                return batch

    def _take(self, key: Hashable) -> list[QueuedWork]:
        """Queued work with `key`, oldest first, up to max_batch rows (at least one); caller holds the lock."""
        batch: list[QueuedWork] = []
        rows = 0
        kept: deque[QueuedWork] = deque()
        for queued in self._pending:
            if queued.future.cancelled():
                continue
            if queued.key == key and (not batch or rows + queued.rows <= self.max_batch):
                batch.append(queued)
                rows += queued.rows
            else:
                kept.append(queued)
        self._pending = kept
        return batch

    def _run(self, batch: list[QueuedWork]) -> None:
        batch = [queued for queued in batch if not queued.future.cancelled()]
        if not batch:
            return
        key = batch[0].key
        start = time.perf_counter()
        try:
            results = self.runner(key, [queued.payload for queued in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"runner returned {len(results)} results for {len(batch)} payloads")
        except Exception as error:
            if len(batch) > 1:
                _logger.info("a batch of %d requests failed (%.300s); retrying each alone", len(batch), error)
                for queued in batch:
                    self._run([queued])
                return
            self._finish(batch[0], None, error)
            return
        finally:
            if self.on_batch is not None:
                self.on_batch(key, sum(queued.rows for queued in batch), len(batch), time.perf_counter() - start)
        for queued, result in zip(batch, results):
            self._finish(queued, result, None)

    @staticmethod
    def _finish(queued: QueuedWork, result: Any, error: BaseException | None) -> None:
        try:
            queued.loop.call_soon_threadsafe(_resolve, queued.future, result, error)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass
