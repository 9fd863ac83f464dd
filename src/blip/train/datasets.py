"""Training data: datasets, the global batch sampler, WebDataset streaming.

Sources are found and read by `blip.data.manifests` (folders, JSONL/CSV/TSV manifests, Karpathy/COCO/VQAv2 json) and
`blip.data.webdataset` (tar shards).

Bad rows never stop a run: rows whose image file is missing, whose text is empty or whose JSON is broken are skipped
when the manifest is read, images that fail to decode are replaced by the next row at load time, tar samples without
an image or text or with duplicate member names are skipped while streaming, and all of it is counted in a `SkipLog`
and reported.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler

from blip.data.manifests import CAPTION_COLUMNS, DataError, SkipLog, first_value, texts_of
from blip.data.webdataset import ShardError, TarSample, iter_tar_samples
from blip.transforms import ImageDecodeError, load_image

__all__ = ["GlobalBatchSampler", "PairDataset", "QuestionDataset", "TarPairStream", "count_tar_samples", "sample_rng"]

_logger = logging.getLogger(__name__)

ImageFn = Callable[[Image.Image, random.Random], torch.Tensor]


# --- datasets ----------------------------------------------------------------------------------------------------


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The augmentation RNG of one sample: a function of (seed, epoch, index) only, so any worker count and any
    resume point see the same augmentation."""
    return random.Random(f"blip.train/{seed}/{epoch}/{index}")


class _ImageRows(Dataset):
    """Shared by the map-style datasets: keys are `(epoch, index)`; a row whose image(s) fail to decode is replaced
    by the next row (and counted). `_decode` says what a row's images are (one image here; a pair for NLVR)."""

    empty_error = "no usable rows"
    exhausted_error = "no row of this dataset has a decodable image"

    def __init__(self, rows: list[Any], image_fn: ImageFn, seed: int = 0, cache_bytes: int = 0):
        if not rows:
            raise DataError(self.empty_error)
        self.rows, self.image_fn, self.seed = rows, image_fn, seed
        self.skips = SkipLog()
        self._bad: set[int] = set()
        # `_load`'s pixels by image (path, or row index), up to `cache_bytes`; only for an `image_fn` that ignores
        # the sample's RNG (no augmentation), whose pixels are the same every epoch
        self._cache: dict[Any, torch.Tensor] = {}
        self._cache_left = cache_bytes

    def __len__(self) -> int:
        return len(self.rows)

    def _decode(self, row: Any) -> Any:
        return load_image(row.image)

    @staticmethod
    def _epoch_index(key: tuple[int, int] | int) -> tuple[int, int]:
        """A sampler key: (epoch, index), or a bare index (epoch 0)."""
        return key if isinstance(key, tuple) else (0, key)

    def _decoded(self, key: tuple[int, int] | int) -> tuple[Any, Any, random.Random]:
        """(row, its decoded image(s), the sample's RNG) for `key`, skipping rows that fail to decode."""
        epoch, index = self._epoch_index(key)
        for attempt in range(len(self.rows)):
            i = (index + attempt) % len(self.rows)
            if i in self._bad:
                continue
            row = self.rows[i]
            try:
                images = self._decode(row)
            except ImageDecodeError as e:
                self._bad.add(i)
                self.skips.skip("undecodable image", str(e))
                _logger.warning("skipping row %d: %s", i, e)
                continue
            return row, images, sample_rng(self.seed, epoch, index)
        raise DataError(self.exhausted_error)

    def _load(self, key: tuple[int, int] | int) -> tuple[Any, torch.Tensor, random.Random]:
        """(row, its pixels, the sample's RNG) for `key`: from the cache, or decoded (and then cached while there is
        room)."""
        epoch, index = self._epoch_index(key)
        row = self.rows[index]
        name = row.image if isinstance(row.image, str) else index
        pixels = self._cache.get(name)
        if pixels is not None:
            return row, pixels, sample_rng(self.seed, epoch, index)
        row, image, rng = self._decoded(key)
        pixels = self.image_fn(image, rng)
        if self._cache_left >= pixels.nbytes and row is self.rows[index]:  # not a replacement for a bad row
            self._cache[name] = pixels
            self._cache_left -= pixels.nbytes
        return row, pixels, rng


class PairDataset(_ImageRows):
    """(image, caption) pairs -> `{"pixel_values": [3, S, S], "text": str, "image_id": int}`, plus `"negatives"`:
    `negatives` distinct texts of the row's written negatives (texts false for the image; all of them when it has
    fewer), drawn by the sample's RNG, when it has any."""

    def __init__(self, rows: list[Any], image_fn: ImageFn, seed: int = 0, negatives: int = 1, cache_bytes: int = 0):
        super().__init__(rows, image_fn, seed, cache_bytes)
        self.negatives = negatives

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        row, pixels, rng = self._load(key)
        item = {"pixel_values": pixels, "text": row.text, "image_id": row.image_id}
        written = getattr(row, "negatives", ())
        if written and self.negatives == 1:  # one draw, as before `negatives` existed: the same RNG stream
            item["negatives"] = [rng.choice(written)]
        elif written and self.negatives > 1:
            item["negatives"] = rng.sample(written, min(self.negatives, len(written)))
        return item


class QuestionDataset(_ImageRows):
    """VQA questions -> `{"pixel_values", "question", "answers": [...], "weights": [...]}`."""

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        row, pixels, _ = self._load(key)
        answers, weights = row.answer_weights()
        return {"pixel_values": pixels, "question": row.question, "answers": answers, "weights": weights}


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Per-rank micro-batches of `(epoch, index)` keys. Each epoch is a seeded permutation cut into global batches
    of `batch_size * world_size`; rank r takes the r-th contiguous slice of every global batch, so the global batch
    is the same for any number of processes. The last incomplete global batch is dropped. `start` skips batches
    already consumed (resume)."""

    def __init__(
        self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True
    ):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.num_batches = size // (batch_size * world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        global_batch = self.batch_size * self.world_size
        for b in range(self.start, self.num_batches):
            first = b * global_batch + self.rank * self.batch_size
            yield [(self.epoch, i) for i in order[first : first + self.batch_size]]


# --- WebDataset shards -------------------------------------------------------------------------------------------


def _tar_samples(path: str, skips: SkipLog | None = None) -> Iterator[TarSample]:
    """Samples (with every member's bytes) of one tar, streamed; a broken shard ends early, counted and logged."""
    try:
        yield from iter_tar_samples(path, stream=True)
    except ShardError as e:
        if skips is not None:
            skips.skip("broken tar", str(e))
        _logger.warning("%s: stopped reading a broken tar shard (%s)", path, e)


def _sample_text(sample: TarSample) -> str | None:
    ext = sample.text_extension()
    if ext is not None:
        try:
            text = sample.data[ext].decode("utf-8")
        except UnicodeDecodeError:
            return None
        return " ".join(text.split()) or None
    if "json" in sample.data:
        try:
            row = json.loads(sample.data["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        texts = texts_of(first_value(row, "caption", CAPTION_COLUMNS)) if isinstance(row, dict) else []
        return " ".join(texts[0].split()) if texts and texts[0].strip() else None
    return None


def count_tar_samples(shards: list[str]) -> list[int]:
    """Usable samples per shard: with an image member and no duplicate member names (reads the headers only; used to
    size epochs)."""
    counts = []
    for shard in shards:
        count = 0
        try:
            for sample in iter_tar_samples(shard, read=lambda ext, size: False):
                count += sample.image_extension() is not None and not sample.duplicates
        except ShardError as e:
            _logger.warning("%s: broken tar shard (%s)", shard, e)
        counts.append(count)
    return counts


class TarPairStream(IterableDataset):
    """(image, caption) samples streamed from WebDataset shards, endlessly: shards are reshuffled each pass, and
    each process (rank x dataloader worker) keeps every n-th sample, so all ranks stream the same number of samples.
    The trainer takes `steps x batch` samples per epoch; `set_position(epoch, skip_batches)` resumes exactly.
    Samples without an image or text, or whose image does not decode, are skipped and counted."""

    def __init__(
        self,
        shards: list[str],
        image_fn: ImageFn,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if not shards:
            raise DataError("no tar shards")
        self.shards, self.image_fn, self.batch_size = list(shards), image_fn, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.skip_batches = 0, 0
        self.skips = SkipLog()

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def _raw(self, epoch: int) -> Iterator[tuple[int, TarSample]]:
        """(stream position, sample) over every shard, endlessly, reshuffled per pass."""
        position, cycle = 0, 0
        while True:
            order = list(self.shards)
            random.Random(f"blip.tar/{self.seed}/{epoch}/{cycle}").shuffle(order)
            produced = False
            for shard in order:
                for sample in _tar_samples(shard, self.skips):
                    produced = True
                    yield position, sample
                    position += 1
            if not produced:
                raise DataError("the tar shards hold no samples")
            cycle += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # DataLoader hands out batches round-robin from worker 0; after `skip` batches the next one must come from
        # the worker that would have made batch `skip`, so worker w plays the role of worker (w + skip) % workers.
        role = (worker + self.skip_batches) % workers
        skip_samples = len(range(role, self.skip_batches, workers)) * self.batch_size
        streams = self.world_size * workers
        mine = self.rank * workers + role
        kept = 0
        for position, sample in self._raw(self.epoch):
            if position % streams != mine:
                continue
            key = sample.key
            if sample.duplicates:
                self.skips.skip("duplicate member name", f"{key} ({', '.join(sample.duplicates)})")
                continue
            image_ext = sample.image_extension()
            text = _sample_text(sample)
            if image_ext is None or text is None:
                self.skips.skip("no image" if image_ext is None else "empty text", key)
                continue
            try:  # decoded even when skipping on resume: a bad image must be skipped as the first pass did
                image = load_image(sample.data[image_ext], name=key)
            except ImageDecodeError as e:
                self.skips.skip("undecodable image", str(e))
                continue
            if kept < skip_samples:
                kept += 1
                continue
            pixels = self.image_fn(image, sample_rng(self.seed, self.epoch, position))
            kept += 1
            yield {"pixel_values": pixels, "text": text, "image_id": position}
