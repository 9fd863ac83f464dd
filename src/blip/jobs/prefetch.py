"""The prefetch pipeline: images are read and decoded in worker threads while the model runs on earlier batches.

Pillow releases the GIL while it decodes and resizes, so threads overlap with each other and with torch's own
threads. `depth` batches are kept in flight; results come back in order.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from PIL import Image

from blip.jobs.sources import Row, RowError

_logger = logging.getLogger(__name__)

B = TypeVar("B")


@dataclass
class Decoded:
    """A batch's distinct images by `decode_key`: the decoded image, or in `errors` the reason it failed."""

    images: dict[str, Image.Image]
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


class Prefetcher(Generic[B]):
    """Decodes the rows of upcoming batches in `workers` threads, `depth` batches ahead of the consumer."""

    def __init__(
        self,
        loader: Callable[[Row], Image.Image],
        rows_of: Callable[[B], list[Row]],
        *,
        workers: int = 2,
        depth: int = 4,
    ):
        self.loader = loader
        self.rows_of = rows_of
        self.workers = max(1, workers)
        self.depth = max(1, depth)

    def __call__(self, batches: Iterable[B]) -> Iterator[tuple[B, Decoded]]:
        pending: deque[tuple[B, dict[str, Future[Image.Image | str]]]] = deque()
        source = iter(batches)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="blip-decode")

        def submit() -> bool:
            batch = next(source, None)
            if batch is None:
                return False
            futures: dict[str, Future[Image.Image | str]] = {}
            for row in self.rows_of(batch):
                key = decode_key(row)
                if key not in futures:
                    futures[key] = pool.submit(decode_one, row, self.loader)
            pending.append((batch, futures))
            return True

        try:
            while len(pending) < self.depth and submit():
                pass
            while pending:
                batch, futures = pending.popleft()
                submit()
                images, errors = {}, {}
                for key, future in futures.items():
                    result = future.result()
                    if isinstance(result, str):
                        errors[key] = result
                    else:
                        images[key] = result
                yield batch, Decoded(images, errors)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def decode_key(row: Row) -> str:
    """Rows with the same image share one decode; a row with a problem is decoded (i.e. failed) on its own."""
    return row.source if row.source and not row.problem else f"\0{row.id}\0{row.problem}"
