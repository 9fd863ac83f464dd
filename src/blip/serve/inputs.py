"""Request images -> decoded RGB images: base64, URL (through the safe fetcher) or uploaded bytes, each checked
(format sniffed, pixels capped before decoding) and named by its request field in every error."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import logging
import re
from dataclasses import dataclass

import anyio

from blip.fetch import FetchError, SafeFetcher, describe_content, sniff_image_type
from blip.serve.schemas import ApiError, ImageRef
from blip.tasks.batch import ImageItem
from blip.transforms import ImageDecodeError, load_image

_logger = logging.getLogger(__name__)

SCHEME = re.compile(r"^\s*([A-Za-z][A-Za-z0-9+.\-]*):")
URL_SAFE = str.maketrans("-_", "+/")


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


def from_string(value: str, field: str) -> ImageSource:
    """A string that is either an http(s) URL or base64 (Azure ML's image column)."""
    match = SCHEME.match(value)
    if match is None:
        return ImageSource(field, "b64", value)
    return ImageSource(field, "url", value.strip())


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


class ImageLoader:
    def __init__(self, fetcher: SafeFetcher, *, max_pixels: int, max_bytes: int, decode_workers: int = 4):
        self.fetcher = fetcher
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self._decode_limit = anyio.CapacityLimiter(decode_workers)

    async def load(self, sources: list[ImageSource]) -> list[ImageItem]:
        """All images of a request, fetched and decoded concurrently; a repeated input is loaded once."""
        distinct: dict[tuple[str, str | bytes], int] = {}
        order: list[int] = []
        firsts: list[ImageSource] = []
        for source in sources:
            key = (source.kind if source.kind != "bytes" else "b", source.value)
            if key not in distinct:
                distinct[key] = len(firsts)
                firsts.append(source)
            order.append(distinct[key])
        tasks = [asyncio.ensure_future(self._load_one(s)) for s in firsts]
        try:
            loaded = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return [loaded[i] for i in order]

    async def _load_one(self, source: ImageSource) -> ImageItem:
        if source.kind == "url":
            try:
                data = await self.fetcher.fetch(str(source.value), name=source.field)
            except FetchError as e:
                raise ApiError(e.status, e.code, str(e), field=source.field) from e
        elif source.kind == "b64":
            data = decode_base64(str(source.value), source.field)
        else:
            data = bytes(source.value)  # type: ignore[arg-type]
        return await self.decode(data, source.field)

    async def decode(self, data: bytes, field: str) -> ImageItem:
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
        decode = functools.partial(load_image, data, max_pixels=self.max_pixels, name=field)
        try:
            image = await anyio.to_thread.run_sync(decode, limiter=self._decode_limit)
        except ImageDecodeError as e:
            too_large = "refused before decoding" in str(e)
            status, code = (413, "image_too_large") if too_large else (422, "invalid_image")
            raise ApiError(status, code, str(e), field=field) from e
        except (MemoryError, OSError, ValueError) as e:  # never let a decoder failure become a 500
            raise ApiError(422, "invalid_image", f"{field}: cannot decode ({type(e).__name__})", field=field) from e
        return ImageItem(hashlib.sha256(data).hexdigest(), image)
