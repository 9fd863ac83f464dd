"""Running the model on a batch of rows (the same `blip.tasks` functions as everywhere else), and working through
shards: prefetch, run, journal each batch, commit each finished shard.

A row whose image cannot be read, or whose inference fails on its own, becomes an error row; the job goes on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from blip.jobs.prefetch import BatchDecoder, Decoded, Prefetcher, decode_key
from blip.jobs.sources import Row
from blip.jobs.writer import BatchRecord, Journal, OutputDir, Receipt
from blip.tasks.batch import CaptionWork, EmbedWork, ImageItem, PairWork, ReasonWork, dispatch, row_seed
from blip.tasks.options import OPTIONS, OptionError, TaskOptionsBase, embedding_shape

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)

TASKS = ("caption", "vqa", "match", "embed", "reason")
MODEL_TASK = {"caption": "caption", "vqa": "vqa", "match": "itm", "embed": "itc", "reason": "reason"}
MAX_FAILED_BATCHES = 3  # consecutive batches whose every row failed inference: something is wrong with the job


class JobError(RuntimeError):
    """The job cannot go on (not a row's fault). Finished work is kept; a rerun resumes."""


def _for_task(self: Any, task: str) -> TaskOptionsBase | None:
    """The task's options (`blip.tasks.options`), validated: fields left None take the task's defaults. None for
    a task without options (embed)."""
    cls = OPTIONS.get(task)
    given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
    if cls is None:
        return None
    for name in given:
        if name not in cls.specs():
            raise OptionError(name, f"is not an option of {task} jobs")
    return cls(**given)


def _describe(self: Any, task: str) -> dict[str, Any]:
    """The options that change `task`'s results, as plain JSON (part of the job's fingerprint)."""
    options = self.for_task(task)
    return options.describe() if options is not None else {}


def _task_options_class() -> type:
    """`TaskOptions`: every task's options (`blip.tasks.options`) in one frozen dataclass, each None by default (the
    task's own default); generated, so a new option is a batch-job option too."""
    names = dict.fromkeys(name for cls in OPTIONS.values() for name in cls.specs())
    cls = dataclasses.make_dataclass(
        "TaskOptions",
        [(name, Any, dataclasses.field(default=None)) for name in names],
        frozen=True,
        namespace={"for_task": _for_task, "describe": _describe, "__doc__": _task_options_class.__doc__},
    )
    cls.__module__ = __name__  # pickles (Ray) as blip.jobs.runner.TaskOptions
    return cls


TaskOptions = _task_options_class()


def check_model_task(blip: Blip, task: str) -> None:
    need = MODEL_TASK[task]
    if need not in blip.tasks:
        blip.require(need)  # raises the API's own message naming the checkpoint kind that has the head


class RowRunner:
    """One batch of rows -> one result per row: {"ok": output row} or {"error": error row} (+ embeddings)."""

    def __init__(self, blip: Blip, task: str, options: Any):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
        check_model_task(blip, task)
        self.blip = blip
        self.task = task
        self.options = options.for_task(task)
        if self.options is not None:
            self.options.check_model(blip)  # before any row: a job over the model's limits stops here
        # Sampling with a seed: each row samples from its own generator, seeded by (seed, row id), so a row's
        # captions do not depend on the batch it lands in, and a resumed job samples what the first run would have.
        self.seed = getattr(self.options, "seed", None) if getattr(self.options, "do_sample", False) else None
        if getattr(self.options, "do_sample", False) and self.seed is None:
            _logger.warning("sampling without a seed: rows are not reproducible (a resumed job samples anew)")
        self._failed_batches = 0

    @property
    def image_size(self) -> int:
        return self.blip.transform.image_size

    @property
    def decode_size(self) -> int | None:
        """The square size the prefetch workers resize images to (None: each image at its own size)."""
        return self.image_size

    @property
    def device(self) -> torch.device:
        return self.blip.device

    def batch_decoder(self) -> BatchDecoder:
        """What the prefetcher decodes each row with (picklable: it runs in the decode workers)."""
        return BatchDecoder(self.decode_size)

    def image_rows(self, row: Row) -> list[Row]:
        """The rows to decode for `row` (a pair task adds its second image as a row of its own)."""
        return [row]

    def decode_error(self, row: Row, decoded: Decoded) -> str | None:
        """Why `row`'s image could not be read, or None."""
        return decoded.errors.get(decode_key(row))

    def error_row(self, row: Row, reason: str) -> dict[str, Any]:
        out: dict[str, Any] = {"image": row.id}
        if self.task == "vqa":
            out["question"] = row.question
        elif self.task == "match":
            out["text"] = row.text
        out["error"] = reason
        return out

    def run(self, rows: Sequence[Row], decoded: Decoded) -> tuple[list[dict[str, Any]], np.ndarray | None]:
        items: list[dict[str, Any] | None] = [None] * len(rows)
        good: list[int] = []
        for i, row in enumerate(rows):
            reason = self.decode_error(row, decoded)
            if reason is not None:
                items[i] = {"error": self.error_row(row, reason)}
            else:
                good.append(i)
        vectors: dict[int, np.ndarray] = {}
        if good:
            try:
                outputs = self._infer([rows[i] for i in good], decoded)
                self._failed_batches = 0
            except Exception as e:
                _logger.warning("a batch of %d rows failed (%s: %s); retrying its rows one by one", len(good), *_why(e))
                outputs = self._infer_one_by_one([rows[i] for i in good], decoded)
            for i, output in zip(good, outputs):
                if isinstance(output, str):
                    items[i] = {"error": self.error_row(rows[i], output)}
                elif isinstance(output, np.ndarray):
                    items[i] = {"ok": self._embed_row(rows[i])}
                    vectors[i] = output
                else:
                    items[i] = {"ok": output}
        embeddings = None
        if self.task == "embed":
            ok = [i for i in range(len(rows)) if i in vectors]
            shape = embedding_shape(self.blip)
            embeddings = np.stack([vectors[i] for i in ok]) if ok else np.zeros((0, *shape), np.float32)
        return [item for item in items if item is not None], embeddings

    def _infer_one_by_one(self, rows: list[Row], decoded: Decoded) -> list[Any]:
        outputs: list[Any] = []
        for row in rows:
            try:
                outputs += self._infer([row], decoded)
            except Exception as e:
                _logger.debug("row %s failed", row.id, exc_info=True)
                outputs.append("inference failed: {}: {}".format(*_why(e)))
        if all(isinstance(o, str) for o in outputs):
            self._failed_batches += 1
            if self._failed_batches >= MAX_FAILED_BATCHES:
                raise JobError(f"every row of {MAX_FAILED_BATCHES} batches in a row failed: {outputs[-1]}")
        else:
            self._failed_batches = 0
        return outputs

    def _infer(self, rows: list[Row], decoded: Decoded) -> list[Any]:
        """Outputs for rows whose images decoded: an output row (or an embedding) per row, in order. Rows with the
        same image share its encoding (`blip.tasks.batch.dispatch`)."""
        items = [ImageItem(decode_key(row), decoded.images[decode_key(row)]) for row in rows]
        if self.task == "caption":
            works = [
                CaptionWork([item], None if self.seed is None else [row_seed(self.seed, row.id)])
                for row, item in zip(rows, items)
            ]
            results = dispatch(self.blip, "caption", self.options, works)
            return [self._caption_row(row, result[0]) for row, result in zip(rows, results)]
        if self.task == "vqa":
            works = [PairWork([item], [row.question or ""], [0]) for row, item in zip(rows, items)]
            answers = dispatch(self.blip, "vqa", self.options, works)
            return [
                {"image": row.id, "question": row.question, "answer": a[0].text, "score": a[0].score}
                for row, a in zip(rows, answers)
            ]
        if self.task == "match":
            works = [PairWork([item], [row.text or ""], [0]) for row, item in zip(rows, items)]
            probs = dispatch(self.blip, "match", self.options, works)
            return [{"image": row.id, "text": row.text, "score": p[0]} for row, p in zip(rows, probs)]
        feats = dispatch(self.blip, "embed", None, [EmbedWork([item]) for item in items])
        return [f[0] for f in feats]

    def _caption_row(self, row: Row, captions: list[Any]) -> dict[str, Any]:
        if len(captions) == 1:
            return {"image": row.id, "caption": captions[0].text, "score": captions[0].score}
        return {"image": row.id, "captions": [c.text for c in captions], "scores": [c.score for c in captions]}

    def _embed_row(self, row: Row) -> dict[str, Any]:
        out: dict[str, Any] = {"image": row.id, "source": row.source}
        if row.text is not None:
            out["text"] = row.text
        return out


class ReasonRowRunner(RowRunner):
    """`blip batch reason`: each row is a pair of images and a statement; both images are decoded (and fail) like
    any image, and an error names the one that failed."""

    def __init__(self, blip: Blip, options: Any):
        super().__init__(blip, "reason", options)

    def image_rows(self, row: Row) -> list[Row]:
        """The row itself and its second image as a row of its own."""
        if row.problem or not row.source_b:
            return [row]
        return [row, second_image(row)]

    def decode_error(self, row: Row, decoded: Decoded) -> str | None:
        """Why one image of `row`'s pair could not be read (prefixed with which), or None."""
        for image_row in self.image_rows(row):
            reason = decoded.errors.get(decode_key(image_row))
            if reason is not None:
                which = "" if row.problem else "image_b: " if image_row is not row else "image_a: "
                return which + reason
        return None

    def _pair_row(self, row: Row) -> dict[str, Any]:
        return {"id": row.id, "image_a": row.source, "image_b": row.source_b, "statement": row.text}

    def error_row(self, row: Row, reason: str) -> dict[str, Any]:
        return {**self._pair_row(row), "error": reason}

    def _infer(self, rows: list[Row], decoded: Decoded) -> list[Any]:
        works = []
        for row in rows:
            key_a, key_b = decode_key(row), decode_key(second_image(row))
            images = [ImageItem(key_a, decoded.images[key_a]), ImageItem(key_b, decoded.images[key_b])]
            works.append(ReasonWork(images, [row.text or ""], [0], [1]))
        verdicts = dispatch(self.blip, "reason", None, works)
        return [{**self._pair_row(row), "label": v[0].label, "score": v[0].score} for row, v in zip(rows, verdicts)]


def make_row_runner(blip: Blip, task: str, options: Any) -> RowRunner:
    """The runner of an image job's task (`reason` has its own: pairs of images)."""
    return ReasonRowRunner(blip, options) if task == "reason" else RowRunner(blip, task, options)


def second_image(row: Row) -> Row:
    """A pair row's second image as a row of its own (decoded, de-duplicated and failed like any image)."""
    return Row(id=f"{row.id} (image_b)", source=row.source_b or "", text=row.text)


def _why(e: BaseException) -> tuple[str, str]:
    return type(e).__name__, str(e).splitlines()[0] if str(e) else ""


# ---------------------------------------------------------------------------------------------------------------------
# Shards


@dataclass
class ShardTask:
    shard: int
    rows: list[Row]


@dataclass
class _ShardState:
    task: ShardTask
    journal: Journal


@dataclass
class _Batch:
    state: _ShardState
    start: int
    rows: list[Row] = field(default_factory=list)


def split_shards(rows: list[Row], shard_size: int) -> list[ShardTask]:
    return [ShardTask(k, rows[start : start + shard_size]) for k, start in enumerate(range(0, len(rows), shard_size))]


class ShardWorker:
    """Works through shards in one process: decode ahead (`workers` processes, 0: threads here), run the model,
    journal each batch, commit each shard."""

    def __init__(
        self,
        runner: RowRunner,
        out: OutputDir,
        job_fingerprint: str,
        *,
        batch_size: int = 16,
        workers: int = 0,
        prefetch: int = 4,
    ):
        self.runner = runner
        self.out = out
        self.job_fingerprint = job_fingerprint
        self.batch_size = max(1, batch_size)
        self.prefetcher: Prefetcher[_Batch] = Prefetcher(
            runner.decode_size,
            lambda b: [r for row in b.rows for r in runner.image_rows(row)],
            workers=workers,
            depth=prefetch,
            device=runner.device,
            decoder=runner.batch_decoder(),
        )

    def process(
        self,
        shards: Sequence[ShardTask],
        *,
        progress: Callable[[int], None] | None = None,
        on_commit: Callable[[Receipt], None] | None = None,
    ) -> list[Receipt]:
        states = []
        receipts: list[Receipt] = []
        try:
            for task in shards:
                if self.out.receipt_path(task.shard).exists():  # committed already (not listing every receipt)
                    continue
                header = {"journal": 1, "shard": task.shard, "rows": len(task.rows), "job": self.job_fingerprint}
                state = _ShardState(task, self.out.open_journal(task.shard, header))
                if progress and state.journal.rows_done:
                    progress(state.journal.rows_done)
                states.append(state)
            for state in states:
                if state.journal.rows_done >= len(state.task.rows):  # journaled in full before a crash
                    receipts.append(self._commit(state, on_commit))
            for batch, decoded in self.prefetcher(self._batches(states)):
                items, embeddings = self.runner.run(batch.rows, decoded)
                state = batch.state
                state.journal.append(BatchRecord(batch.start, items, embeddings))
                if progress:
                    progress(len(batch.rows))
                if state.journal.rows_done >= len(state.task.rows):
                    receipts.append(self._commit(state, on_commit))
        finally:
            for state in states:
                state.journal.close()
        return receipts

    def close(self) -> None:
        """Stop the decode worker processes (a Ray actor keeps them for its next shard)."""
        self.prefetcher.close()

    def _batches(self, states: list[_ShardState]) -> Iterator[_Batch]:
        for state in states:
            rows = state.task.rows
            for start in range(state.journal.rows_done, len(rows), self.batch_size):
                yield _Batch(state, start, rows[start : start + self.batch_size])

    def _commit(self, state: _ShardState, on_commit: Callable[[Receipt], None] | None) -> Receipt:
        task = state.task
        receipt = self.out.commit(task.shard, len(task.rows), state.journal.records, self.job_fingerprint)
        state.journal.remove()
        _logger.info("shard %d done: %d rows, %d failed", task.shard, receipt.rows, len(receipt.errors))
        if on_commit:
            on_commit(receipt)
        return receipt
