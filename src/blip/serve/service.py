"""The one service every route reaches (`app.state.service`): settings, models, indexes, the micro-batcher, the image
loader, metrics; auth, model choice and limit checks; and `run()`, which takes a request from admission to its model
result."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
from fastapi.security import HTTPAuthorizationCredentials

from blip.fetch import FetchLimits, SafeFetcher, SyncFetcher
from blip.models.generation import TokenListener, token_listener
from blip.serve.batching import BatcherClosed, MicroBatcher, QueueFull, Slot
from blip.serve.errors import ApiError
from blip.serve.indexes import IndexSpec, ServedIndex, open_indexes
from blip.serve.inputs import ImageLoader, ImageSource
from blip.serve.metrics import ServerMetrics
from blip.serve.middleware import UNAUTHORIZED_MESSAGE, token_matches
from blip.serve.settings import ServeSettings
from blip.tasks.batch import (
    CaptionWork,
    EmbedWork,
    ImageItem,
    PairWork,
    ReasonWork,
    SimilarityWork,
    TopAnswers,
    dispatch,
    rows,
)
from blip.tasks.common import Answer, Caption, Verdict
from blip.tasks.options import CaptionOptions, OptionError, VqaOptions, is_blip2
from blip.tasks.retrieval import Hit, RetrieveOptions, RetrieveWork

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)

HEADS = {"caption": "caption", "vqa": "vqa", "match": "itm", "similarity": "itc", "embed": "itc", "reason": "reason"}
WHAT = {
    "caption": "caption images",
    "vqa": "answer questions",
    "match": "match images with texts",
    "similarity": "compare images with texts",
    "embed": "embed images",
    "reason": "judge statements about image pairs (NLVR2)",
}


@dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys may share a model call."""

    task: str  # "caption" | "vqa" | "match" | "similarity" | "retrieve"
    model: str
    options: Hashable = None  # the task's options (`blip.tasks.options`, `RetrieveOptions`)
    solo: int | None = None  # set (unique per request) for work that must run alone, e.g. sampling with a seed


@dataclass
class Listened:
    """A streaming request's work: run alone, its decoding reporting each step's new tokens to `listener` on the
    inference thread (`blip.models.generation.token_listener`)."""

    work: Any
    listener: TokenListener

    @property
    def rows(self) -> int:
        return rows(self.work)


class Service:
    """What the routes share: settings, models, batcher, image loader, metrics."""

    def __init__(
        self,
        models: dict[str, Blip] | None,
        settings: ServeSettings,
        loader: Callable[[], dict[str, Blip]] | None = None,
        fetcher: SafeFetcher | None = None,
        on_load_error: Callable[[BaseException], None] | None = None,
        indexes: dict[str, IndexSpec] | None = None,
    ):
        self.settings = settings
        self.started_at = int(time.time())  # Unix seconds (the OpenAI model list's `created`)
        self.models: dict[str, Blip] = dict(models or {})
        self.loader = loader
        self.on_load_error = on_load_error
        limits = FetchLimits(
            max_bytes=settings.fetch_max_bytes,
            max_redirects=settings.fetch_max_redirects,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            read_timeout_s=settings.fetch_read_timeout_s,
            total_timeout_s=settings.fetch_total_timeout_s,
        )
        self.index_specs = dict(indexes or {})
        # re-ranking reads the collection's http(s) rows on the inference thread: the blocking face of the fetcher
        self.index_fetcher = SyncFetcher(limits, allow_loopback=settings.fetch_allow_loopback)
        self.index_fetch = functools.partial(self.index_fetcher.fetch, name="collection image")
        self.indexes: dict[str, ServedIndex] = {}
        if loader is None and self.index_specs:  # models given: open the indexes now (IndexSetupError if one fails)
            self.indexes = open_indexes(self.index_specs, self.models, self.index_fetch)
        self.loaded = loader is None
        self.load_error: str | None = None
        self.metrics = ServerMetrics()
        self.batcher = MicroBatcher(
            self.run_batch,
            max_batch=settings.batch_rows(self.device),
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            on_batch=self._observe_batch,
        )
        self.fetcher = fetcher or SafeFetcher(limits, allow_loopback=settings.fetch_allow_loopback)
        self.images = ImageLoader(
            self.fetcher,
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.fetch_max_bytes,
            decode_workers=settings.decode_workers,
            max_request_pixels=settings.max_request_pixels,
            max_inflight_pixels=settings.max_inflight_pixels,
        )
        self._solo = itertools.count()
        gauge = self.metrics.gauge
        gauge("blip_queue_depth", "Jobs waiting for the model.", lambda: self.batcher.depth)
        gauge("blip_requests_admitted", "Requests holding a queue slot.", lambda: self.batcher.admitted)
        gauge("blip_queue_capacity", "Queue slots (admitted requests) at most.", lambda: settings.queue_size)
        gauge("blip_models_loaded", "Models loaded and served.", lambda: len(self.models) if self.loaded else 0)
        gauge("blip_ready", "1 when the server takes work.", lambda: 1 if self.ready else 0)
        gauge("blip_indexes_loaded", "Collection indexes served.", lambda: len(self.indexes) if self.loaded else 0)
        gauge("blip_decode_pixels_in_flight", "Decoded pixels being decoded now.", lambda: self.images.budget.used)
        gauge("blip_decode_waiting", "Images waiting to be decoded.", lambda: self.images.budget.waiting)

    @property
    def device(self) -> str:
        """Where the served models run (the first one's device; "cpu" before any is loaded)."""
        return str(next(iter(self.models.values())).device) if self.models else "cpu"

    # --- lifecycle -------------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.loaded and bool(self.models) and self.batcher.running and self.load_error is None

    def not_ready_reason(self) -> str:
        if self.load_error:
            return self.load_error
        if not self.loaded:
            return "models and indexes are loading" if self.index_specs else "models are loading"
        if not self.models:
            return "no models"
        return "not started or shutting down"

    async def load_models(self) -> None:
        assert self.loader is not None
        stage = "model"
        try:
            models = await anyio.to_thread.run_sync(self.loader)
            self.models.update(models)
            self.batcher.max_batch = self.settings.batch_rows(self.device)  # a GPU takes larger batches
            _logger.info("models loaded: %s", ", ".join(f"{n} ({sorted(m.tasks)})" for n, m in self.models.items()))
            if self.index_specs:
                stage = "index"
                self.indexes = await anyio.to_thread.run_sync(
                    open_indexes, self.index_specs, self.models, self.index_fetch
                )
                described = (f"{n} ({i.count} images, model {i.model})" for n, i in self.indexes.items())
                _logger.info("indexes loaded: %s", ", ".join(described))
            self.loaded = True
        except Exception as e:
            self.load_error = f"{stage} loading failed: {type(e).__name__}: {e}"
            _logger.error("%s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(e)

    def run_batch(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        """The micro-batcher's runner: one merged task call per batch (`blip.tasks.batch.dispatch`)."""
        if not isinstance(key, BatchKey):
            raise TypeError(f"unexpected batch key {key!r}")
        if len(payloads) == 1 and isinstance(payloads[0], Listened):  # a streaming request (always solo)
            with token_listener(payloads[0].listener):
                return dispatch(self.models[key.model], key.task, key.options, [payloads[0].work])
        return dispatch(self.models[key.model], key.task, key.options, payloads)

    def _observe_batch(self, key: Hashable, n_rows: int, n_requests: int, seconds: float) -> None:
        task = key.task if isinstance(key, BatchKey) else "unknown"
        self.metrics.batch_rows.observe(n_rows, task=task)
        self.metrics.batch_requests.observe(n_requests, task=task)
        self.metrics.inference.observe(seconds, task=task)

    # --- checks ----------------------------------------------------------------------------------------------------

    def authorize(self, credentials: HTTPAuthorizationCredentials | None, secret_token: str | None = None) -> None:
        token = self.settings.token
        if not token:
            return
        # every candidate is compared, in constant time, so timing tells nothing about which one was close
        matches = [token_matches(c, token) for c in (credentials.credentials if credentials else None, secret_token)]
        if not any(matches):
            headers = {"WWW-Authenticate": "Bearer"}
            raise ApiError(401, "unauthorized", UNAUTHORIZED_MESSAGE, field="Authorization", headers=headers)

    def check_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, "not_ready", self.not_ready_reason(), headers=self.retry_headers())

    def resolve(self, name: str | None, task: str, field: str = "model") -> tuple[str, Blip]:
        self.check_ready()
        head = HEADS[task]
        if name is not None:
            if name not in self.models:
                message = f"{field}: no model named {name!r}; have {sorted(self.models)}"
                raise ApiError(422, "unknown_model", message, field=field)
            if head not in self.models[name].tasks:
                message = f"{field}: model {name!r} cannot {WHAT[task]} ({self.models[name]!r})"
                raise ApiError(422, "wrong_task", message, field=field)
            return name, self.models[name]
        for model_name, blip in self.models.items():
            if head in blip.tasks:
                return model_name, blip
        loaded = ", ".join(f"{n} ({'/'.join(sorted(m.tasks))})" for n, m in self.models.items())
        raise ApiError(422, "wrong_task", f"{field}: no loaded model can {WHAT[task]}; loaded: {loaded}", field=field)

    def resolve_index(self, name: str | None, field: str = "index") -> ServedIndex:
        self.check_ready()
        if not self.indexes:
            message = f"{field}: this server serves no collection index (start it with --index NAME=DIR)"
            raise ApiError(422, "no_index", message, field=field)
        if name is None:
            if len(self.indexes) > 1:
                message = f"{field}: this server serves several indexes, name one of {sorted(self.indexes)}"
                raise ApiError(422, "invalid_request", message, field=field)
            return next(iter(self.indexes.values()))
        if name not in self.indexes:
            message = f"{field}: no index named {name!r}; have {sorted(self.indexes)}"
            raise ApiError(422, "unknown_index", message, field=field)
        return self.indexes[name]

    def check_count(self, count: int, limit: int, field: str, what: str) -> None:
        if count > limit:
            raise ApiError(422, "too_many", f"{field}: {count} {what}, over the limit of {limit}", field=field)

    def check_images_and_texts(self, n_images: int, texts: list[str]) -> None:
        """The limits of a request that pairs `images` with `texts` (match, similarity)."""
        self.check_count(n_images, self.settings.max_images, "images", "images")
        self.check_count(len(texts), self.settings.max_texts, "texts", "texts")
        self.check_texts([(f"texts[{i}]", t) for i, t in enumerate(texts)])

    def check_questions(
        self, n_images: int, groups: list[list[str]], images_field: str, questions_field: str
    ) -> tuple[list[str], list[int]]:
        """The limits of a VQA request, `groups[i]` the questions about image i; returns (questions, image_of): the
        questions in order and the image each is about."""
        self.check_count(n_images, self.settings.max_images, images_field, "images")
        questions = [q for group in groups for q in group]
        image_of = [i for i, group in enumerate(groups) for _ in group]
        self.check_count(len(questions), self.settings.max_texts, questions_field, "questions")
        self.check_texts([(f"{questions_field}[{i}][{j}]", q) for i, g in enumerate(groups) for j, q in enumerate(g)])
        return questions, image_of

    def check_texts(self, texts: list[tuple[str, str]]) -> None:
        for field, text in texts:
            if len(text) > self.settings.max_text_chars:
                raise ApiError(
                    422,
                    "text_too_long",
                    f"{field}: {len(text)} characters, over the limit of {self.settings.max_text_chars}",
                    field=field,
                )

    def caption_options(self, options: CaptionOptions, blip: Blip) -> CaptionOptions:
        """The server's caps on top of the options' own rules, then the model's limits."""
        s = self.settings
        self._cap("max_new_tokens", options.max_new_tokens, s.max_new_tokens)
        self._cap("num_beams", options.num_beams, s.max_beams)
        self._cap("num_captions", options.num_captions, s.max_captions)
        if options.prompt is not None:
            self.check_texts([("prompt", options.prompt)])
        return self.checked(options, blip)

    def vqa_options(self, options: VqaOptions, blip: Blip) -> VqaOptions:
        self._cap("max_new_tokens", options.max_new_tokens, self.settings.max_new_tokens)
        self._cap("num_beams", options.num_beams, self.settings.max_beams)
        if options.answers is not None:
            self.check_count(len(options.answers), self.settings.max_answers, "answers", "answers")
            self.check_texts([(f"answers[{i}]", a) for i, a in enumerate(options.answers)])
        return self.checked(options, blip)

    def check_question_lengths(self, blip: Blip, options: VqaOptions, questions: list[tuple[str, str]]) -> None:
        """BLIP-2 OPT: each question in its prompt template, after the query tokens, must leave room for
        max_new_tokens in the language model's positions (a 422 naming the question, before any work)."""
        if not is_blip2(blip) or options.answers is not None:
            return
        from blip.tasks.blip2 import check_question_length

        for field, question in questions:
            try:
                check_question_length(blip, options.prompt_template, question, options.max_new_tokens, field)
            except OptionError as e:
                raise self.invalid(field, e.reason) from e

    @classmethod
    def checked(cls, options: Any, blip: Blip) -> Any:
        """`options` if `blip` can run them (e.g. its vocabulary holds the prompt); else a 422 naming the field."""
        cls.options(lambda: options.check_model(blip))
        return options

    @staticmethod
    def options(make: Callable[[], Any]) -> Any:
        """`make()`'s result; a rule of the options layer that fails (`OptionError`) is a 422 naming the field."""
        try:
            return make()
        except OptionError as e:
            raise ApiError(422, "invalid_request", str(e), field=e.field) from e

    def check_top_k(self, top_k: int) -> None:
        self._cap("top_k", top_k, self.settings.max_top_k)

    def _cap(self, field: str, value: int, limit: int) -> None:
        if value > limit:
            raise self.invalid(field, f"{value} is over this server's limit of {limit}")

    @staticmethod
    def invalid(field: str, message: str) -> ApiError:
        return ApiError(422, "invalid_request", f"{field}: {message}", field=field)

    def retry_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    # --- running ---------------------------------------------------------------------------------------------------

    async def run(
        self,
        task: str,
        model: str,
        options: Hashable,
        sources: list[ImageSource],
        build: Callable[[list[ImageItem]], Any],
        *,
        solo: bool = False,
        listener: TokenListener | None = None,
    ) -> Any:
        """Admit, load images, queue for the model, and wait (bounded by the request timeout). With a `listener`
        (a streaming request): alone (no other request's rows), its greedy or sampling decoding calling `listener`
        after each step on the inference thread."""
        if listener is not None:
            build, solo = (lambda items, make=build: Listened(make(items), listener)), True
        try:
            slot = self.batcher.admit()
        except QueueFull as e:
            self.metrics.rejected.inc(reason="queue_full")
            raise ApiError(503, "overloaded", str(e), headers=self.retry_headers()) from e
        except BatcherClosed as e:
            raise ApiError(503, "unavailable", str(e), headers=self.retry_headers()) from e
        key = BatchKey(task, model, options, solo=next(self._solo) if solo else None)
        with slot:
            try:
                return await asyncio.wait_for(self._run(key, sources, build, slot), self.settings.timeout_s)
            except asyncio.TimeoutError as e:
                self.metrics.rejected.inc(reason="timeout")
                message = f"the request took longer than {self.settings.timeout_s:g} s"
                raise ApiError(503, "timeout", message, headers=self.retry_headers()) from e
            except BatcherClosed as e:
                raise ApiError(503, "unavailable", str(e), headers=self.retry_headers()) from e

    async def _run(
        self, key: BatchKey, sources: list[ImageSource], build: Callable[[list[ImageItem]], Any], slot: Slot
    ) -> Any:
        items = await self.images.load(sources, size=self.models[key.model].transform.image_size)
        work = build(items)
        try:
            return await self.batcher.submit(key, work, rows(work), slot)
        except ValueError as e:  # the task functions' own argument checks
            raise ApiError(422, "invalid_request", str(e)) from e

    async def caption(
        self,
        name: str,
        blip: Blip,
        options: CaptionOptions,
        sources: list[ImageSource],
        field: str = "images",
        listener: TokenListener | None = None,
    ) -> list[list[Caption]]:
        self.check_count(len(sources), self.settings.max_images, field, "images")
        options = self.caption_options(options, blip)
        return await self.run("caption", name, options, sources, CaptionWork, solo=options.do_sample, listener=listener)

    async def answer(
        self,
        name: str,
        options: VqaOptions,
        sources: list[ImageSource],
        questions: list[str],
        image_of: list[int],
        fields: list[str],
        listener: TokenListener | None = None,
    ) -> list[Answer]:
        """Answers for questions[q] about sources[image_of[q]]; `fields[q]` names question q in the request."""
        self.check_question_lengths(self.models[name], options, list(zip(fields, questions)))
        pairs = lambda items: PairWork(items, questions, image_of)  # noqa: E731
        return await self.run("vqa", name, options, sources, pairs, listener=listener)

    async def top_answers(
        self,
        name: str,
        options: VqaOptions,
        count: int,
        sources: list[ImageSource],
        questions: list[str],
        image_of: list[int],
        fields: list[str],
        listener: TokenListener | None = None,
    ) -> list[list[Answer]]:
        """`answer`, with the `count` best generated answers per question (the best beams of beam search of width
        `options.num_beams`, at least `count`), best first."""
        self.check_question_lengths(self.models[name], options, list(zip(fields, questions)))
        top = TopAnswers(options, count)
        pairs = lambda items: PairWork(items, questions, image_of)  # noqa: E731
        return await self.run("vqa_top", name, top, sources, pairs, listener=listener)

    async def match(self, name: str, sources: list[ImageSource], texts: list[str], image_of: list[int]) -> list[float]:
        return await self.run("match", name, None, sources, lambda items: PairWork(items, texts, image_of))

    async def similarity(self, name: str, sources: list[ImageSource], texts: list[str]) -> list[list[float]]:
        return await self.run("similarity", name, None, sources, lambda items: SimilarityWork(items, texts))

    async def embed(self, name: str, sources: list[ImageSource]) -> np.ndarray:
        """ITC image features, `[n, dim]` (BLIP) or `[n, queries, dim]` (BLIP-2), float32."""
        self.check_count(len(sources), self.settings.max_images, "images", "images")
        return await self.run("embed", name, None, sources, lambda items: EmbedWork(items))

    async def reason(
        self, name: str, sources: list[ImageSource], statements: list[str], image_a: list[int], image_b: list[int]
    ) -> list[Verdict]:
        """NLVR2 verdicts: statement s about (sources[image_a[s]], sources[image_b[s]])."""
        self.check_count(len(sources), self.settings.max_images, "images", "images")
        self.check_count(len(statements), self.settings.max_texts, "statements", "statements")
        self.check_texts([(f"statements[{i}]", t) for i, t in enumerate(statements)])
        return await self.run(
            "reason", name, None, sources, lambda items: ReasonWork(items, statements, image_a, image_b)
        )

    async def retrieve(
        self, served: ServedIndex, options: RetrieveOptions, text: str | None, image: ImageSource | None
    ) -> list[Hit]:
        """One query against a served index, through the batcher (equal options share a search call)."""
        collection = served.collection
        if image is not None:
            build = lambda items: RetrieveWork(collection, image=items[0])  # noqa: E731
            return await self.run("retrieve", served.model, options, [image], build)
        cost = 1 + options.top_k if options.rerank else 1
        return await self.run(
            "retrieve", served.model, options, [], lambda _: RetrieveWork(collection, text, rows=cost)
        )
