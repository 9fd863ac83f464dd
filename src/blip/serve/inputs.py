"""Request images -> decoded RGB images: base64, URL (through the safe fetcher) or uploaded bytes, each checked
(format sniffed, pixels capped before decoding) and named by its request field in every error.

Decoded pixels are bounded three ways: per image (`max_pixels`), per request (`max_request_pixels`, the sum over a
request's distinct images, read from their headers before any is decoded: 413 past it) and across the server
(`PixelBudget`: an image waits for its pixels to fit among those being decoded, bounded by the request's timeout).
Each image is resized to the model's input size in the same worker call that decodes it, so a full-size image lives
only as long as its decode. glibc keeps freed memory for reuse (Pillow allocates images in 16 MiB blocks, above
malloc's adaptive mmap threshold once one was freed), so after large decodes, when none is in flight, the loader
hands it back to the system (`malloc_trim`); without that an idle server kept gigabytes after a burst."""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import ctypes.util
import functools
import hashlib
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from blip.fetch import FetchError, SafeFetcher, describe_content, sniff_image_type
from blip.serve.errors import ApiError
from blip.serve.schemas import ImageRef
from blip.tasks.batch import ImageItem
from blip.transforms import ImageDecodeError, image_dimensions, load_image

_logger = logging.getLogger(__name__)

SCHEME = re.compile(r"^\s*([A-Za-z][A-Za-z0-9+.\-]*):")
URL_SAFE = str.maketrans("-_", "+/")
T = TypeVar("T")
INLINE_HEADER_BYTES = 1 << 20  # a request's images up to this size have their headers read on the event loop
# malloc_trim after an image this large (its decode grows the heap by tens of MB), at most every TRIM_INTERVAL_S; small
# images leave little to return, and trimming after them costs more (the model's memory faulted back in) than it saves
TRIM_IMAGE_PIXELS = 2_000_000
TRIM_INTERVAL_S = 1.0


def _malloc_trim() -> Callable[[], object] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    return functools.partial(trim, 0)


release_memory = _malloc_trim()


@dataclass(frozen=True)
class ImageSource:
    """One image of a request: `kind` is "url", "b64" or "bytes"; `field` names it in errors."""

    field: str
    kind: str
    value: str | bytes


def from_ref(ref: ImageRef, field: str) -> ImageSource:
    if ref.url is not None:
        return ImageSource(f"{field}.url", "url", ref.url)
    return ImageSource(f"{field}.b64", "b64", ref.b64 or "")


def from_refs(refs: list[ImageRef], field: str = "images") -> list[ImageSource]:
    """A request's list of images, each named `field[i]` in errors."""
    return [from_ref(ref, f"{field}[{i}]") for i, ref in enumerate(refs)]


def from_string(value: str, field: str) -> ImageSource:
    """A string that is either an http(s) URL or base64 (Azure ML's image column)."""
    match = SCHEME.match(value)
    if match is None:
        return ImageSource(field, "b64", value)
    return ImageSource(field, "url", value.strip())


DATA_URL = re.compile(r"^\s*data:image/[A-Za-z0-9.+\-]+;base64,", re.IGNORECASE)


def from_string_or_data_url(value: str, field: str) -> ImageSource:
    """`from_string`, and a `data:image/...;base64,` URL read as its base64 (how the OpenAI API, and clients of the
    Hugging Face one, send an image inline)."""
    match = DATA_URL.match(value)
    if match is not None:
        return ImageSource(field, "b64", value[match.end() :])
    return from_string(value, field)


def decode_base64(text: str, field: str) -> bytes:
    """Standard or URL-safe base64, whitespace and missing padding tolerated; anything else is refused."""
    match = SCHEME.match(text)
    if match is not None:
        scheme = match.group(1).lower()
        raise ApiError(
            422,
            "invalid_image",
            f"{field}: expected base64 image data, got a {scheme}: URL"
            + (" (send the base64 payload without the data: prefix)" if scheme == "data" else ""),
            field=field,
        )
    cleaned = "".join(text.split()).translate(URL_SAFE)
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        data = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, "invalid_base64", f"{field}: not valid base64 ({e})", field=field) from e
    if not data:
        raise ApiError(422, "invalid_image", f"{field}: empty image data", field=field)
    return data


class PixelBudget:
    """Decoded pixels in flight across the server: `acquire(n)` waits (first come, first served) until `n` more fit
    under `capacity`. Used from the event loop only."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, pixels: int) -> None:
        if pixels > self.capacity:
            raise ValueError(f"{pixels} pixels can never fit a budget of {self.capacity}")
        if not self._waiters and self.used + pixels <= self.capacity:
            self.used += pixels
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (pixels, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # granted just as the caller gave up: give it back
                self.release(pixels)
            else:
                if entry in self._waiters:  # `_wake` may have dropped it already, cancelled, while releasing
                    self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, pixels: int) -> None:
        self.used -= pixels
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            pixels, waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += pixels
                waiter.set_result(None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)


async def gather_all(awaitables: list[Awaitable[T]]) -> list[T]:
    """All results, in order; on the first failure the others are cancelled (and awaited) before it is raised."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class ImageLoader:
    def __init__(
        self,
        fetcher: SafeFetcher,
        *,
        max_pixels: int,
        max_bytes: int,
        decode_workers: int = 4,
        max_request_pixels: int | None = None,
        max_inflight_pixels: int | None = None,
    ):
        self.fetcher = fetcher
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.max_request_pixels = max_request_pixels or decode_workers * max_pixels
        self.budget = PixelBudget(max(max_inflight_pixels or decode_workers * max_pixels, max_pixels))
        self._decode_limit = anyio.CapacityLimiter(decode_workers)
        self._untrimmed = False  # a large image was decoded since memory was last handed back
        self._trimmed_at = 0.0
        self._trimming: asyncio.Future[object] | None = None
        self._trim_later: asyncio.TimerHandle | None = None

    async def load(self, sources: list[ImageSource], size: int | None = None) -> list[ImageItem]:
        """All images of a request (resized to size x size when given, as the model's preprocessing does), fetched
        concurrently, their sizes checked against the request's budget, then decoded; a repeated input is loaded
        once."""
        distinct: dict[tuple[str, str | bytes], int] = {}
        order: list[int] = []
        firsts: list[ImageSource] = []
        for source in sources:
            key = (source.kind, source.value)
            if key not in distinct:
                distinct[key] = len(firsts)
                firsts.append(source)
            order.append(distinct[key])
        datas = await gather_all([self._read(s) for s in firsts])
        fields = [s.field for s in firsts]
        if sum(len(d) for d in datas) <= INLINE_HEADER_BYTES:
            pixels = self._measure(datas, fields)
        else:
            pixels = await anyio.to_thread.run_sync(self._measure, datas, fields)
        self._check_request(pixels, fields)
        loaded = await gather_all([self._decode(d, f, p, size) for d, f, p in zip(datas, fields, pixels)])
        return [loaded[i] for i in order]

    async def _read(self, source: ImageSource) -> bytes:
        if source.kind == "url":
            try:
                data = await self.fetcher.fetch(str(source.value), name=source.field)
            except FetchError as e:
                raise ApiError(e.status, e.code, str(e), field=source.field) from e
        elif source.kind == "b64":
            data = decode_base64(str(source.value), source.field)
        else:
            data = bytes(source.value)  # type: ignore[arg-type]
        self._check_bytes(data, source.field)
        return data

    def _check_bytes(self, data: bytes, field: str) -> None:
        if len(data) > self.max_bytes:
            raise ApiError(
                413, "image_too_large", f"{field}: {len(data)} bytes, over the limit of {self.max_bytes}", field=field
            )
        if not data:
            raise ApiError(422, "invalid_image", f"{field}: empty image data", field=field)
        if sniff_image_type(data) is None:
            raise ApiError(
                422,
                "invalid_image",
                f"{field}: not an image in an accepted format (PNG, JPEG, GIF, WebP, BMP, TIFF): "
                f"{describe_content(data)}",
                field=field,
            )

    def _measure(self, datas: list[bytes], fields: list[str]) -> list[int]:
        """Pixels of each image, from its header (worker thread)."""
        pixels = []
        for data, field in zip(datas, fields):
            header = functools.partial(image_dimensions, data, max_pixels=self.max_pixels, name=field)
            width, height = self._guarded(field, header)
            pixels.append(width * height)
        return pixels

    def _check_request(self, pixels: list[int], fields: list[str]) -> None:
        total = 0
        for count, field in zip(pixels, fields):
            total += count
            if total > self.max_request_pixels:
                message = (
                    f"{field}: the request's images come to {total} pixels with this one, over the limit of "
                    f"{self.max_request_pixels} per request (send fewer or smaller images)"
                )
                raise ApiError(413, "too_many_pixels", message, field=field)

    async def _decode(self, data: bytes, field: str, pixels: int, size: int | None) -> ImageItem:
        decode = functools.partial(load_image, data, max_pixels=self.max_pixels, name=field, size=size)

        def work() -> ImageItem:  # the worker thread hashes the bytes too (megabytes: not on the event loop)
            image = self._guarded(field, decode)
            return ImageItem(hashlib.sha256(data).hexdigest(), image)

        await self.budget.acquire(pixels)
        try:
            return await anyio.to_thread.run_sync(work, limiter=self._decode_limit)
        finally:
            self.budget.release(pixels)
            self._untrimmed = self._untrimmed or pixels >= TRIM_IMAGE_PIXELS
            self._trim_when_idle()

    def _trim_when_idle(self) -> None:
        """After large decodes with none in flight, return freed memory to the system (in a thread, not awaited);
        at most every TRIM_INTERVAL_S, and once more when it is up if it was too soon."""
        if release_memory is None or self.budget.used or not self._untrimmed:
            return
        loop = asyncio.get_running_loop()
        wait = self._trimmed_at + TRIM_INTERVAL_S - time.monotonic()
        if wait > 0 or (self._trimming is not None and not self._trimming.done()):
            if self._trim_later is None:
                self._trim_later = loop.call_later(max(wait, 0.1), self._retry_trim)
            return
        self._untrimmed = False
        self._trimmed_at = time.monotonic()
        self._trimming = loop.run_in_executor(None, release_memory)

    def _retry_trim(self) -> None:
        self._trim_later = None
        self._trim_when_idle()

    @staticmethod
    def _guarded(field: str, work: Callable[[], T]) -> T:
        """Decoder failures as 413/422 naming the field, never a 500."""
        try:
            return work()
        except ImageDecodeError as e:
            too_large = "refused before decoding" in str(e)
            status, code = (413, "image_too_large") if too_large else (422, "invalid_image")
            raise ApiError(status, code, str(e), field=field) from e
        except (MemoryError, OSError, ValueError) as e:
            raise ApiError(422, "invalid_image", f"{field}: cannot decode ({type(e).__name__})", field=field) from e
