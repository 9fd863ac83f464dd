"""The HTTP server: `create_app(models, settings)` returns a FastAPI app serving loaded `Blip` models.

This module assembles it: the one `Service` (`app.state.service`: models, indexes, micro-batcher, image loader,
metrics), its lifespan (the inference thread, background model loading), the middleware (limits, auth before the
body, metrics, access log; CORS when asked), the error handlers (every failure in one shape, `blip.serve.errors`)
and the routes (`blip.serve.routes`, a module per API):

- `POST /score`                 Azure ML online-endpoint schema (captioning or VQA, `routes.azure`)
- `POST /`, `POST /predict`     the model card's schema: several questions per image, or captions (`routes.card`)
- `POST /v1/caption|vqa|match|similarity|embed` (JSON) and `.../upload` (multipart): our API, with scores and options
- `POST /v1/retrieve`           search a collection index (`blip serve --index NAME=DIR[@MODEL]`), see below
- `GET /v1/models`, `GET /v1/indexes` (`routes.v1`); `GET /healthz`, `/readyz`, `/metrics`, `/` (web page /
  liveness, `routes.ops`)
- `POST /hf`, `/hf/{model}`     the Hugging Face Inference API: image-to-text and VQA (`routes.hf`)
- `POST /v1/chat/completions`   the OpenAI API: an image and a prompt or question, streaming too (`routes.openai`)

Every model call goes through the micro-batcher (`blip.serve.batching`) into the task functions in `blip.tasks`.

Collection retrieval, `POST /v1/retrieve`, over an index built by `blip batch embed` (the same search as
`blip retrieve`: ITC top-k from the index, text queries then re-ranked by the ITM match probability)::

    {"index": "photos", "text": "a red circle", "top_k": 10, "rerank": true}
    {"image": {"url": "https://..."}, "top_k": 5}          # or {"b64": ...}; the index may be left out if only one
    -> {"index": "photos", "model": "retrieval", "query": "text", "reranked": true,
        "results": [{"rank": 1, "image": "<row id>", "itc_score": 0.41, "itm_score": 0.93}, ...]}

Exactly one of `text` and `image`; `top_k` from 1 to the server's --max-top-k (default 100); `rerank` defaults to
re-ranking text queries when the model has an ITM head (true without one is refused; image queries are ranked by ITC
only). The index's model is the served model whose checkpoint embedded the collection (`blip.serve.indexes`).
Image queries are fetched and decoded like every other image (`blip.serve.inputs`), and the search runs on the
inference thread through the micro-batcher (text queries with the same index, top_k and rerank share one call).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from blip.fetch import SafeFetcher
from blip.serve import errors, routes
from blip.serve.errors import ApiError
from blip.serve.indexes import IndexSpec
from blip.serve.middleware import LOG_PATH_CHARS, ServeMiddleware
from blip.serve.service import Service
from blip.serve.settings import ServeSettings

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)


def create_app(
    models: dict[str, Blip] | None = None,
    settings: ServeSettings | None = None,
    *,
    loader: Callable[[], dict[str, Blip]] | None = None,
    fetcher: SafeFetcher | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
    indexes: dict[str, IndexSpec | str | os.PathLike] | None = None,
) -> FastAPI:
    """A FastAPI app serving `models` (name -> loaded Blip), or the models `loader` returns (loaded in the
    background after start; /readyz says 503 until then), and the collection `indexes` (name -> `blip batch embed`
    output folder or `IndexSpec`) for /v1/retrieve: opened now with `models` (`IndexSetupError` if one cannot be
    served), or after the `loader`'s models."""
    settings = settings or ServeSettings()
    if models is None and loader is None:
        raise ValueError("give models or a loader")
    specs = {n: s if isinstance(s, IndexSpec) else IndexSpec(os.fspath(s)) for n, s in (indexes or {}).items()}
    svc = Service(models, settings, loader=loader, fetcher=fetcher, on_load_error=on_load_error, indexes=specs)
    app = FastAPI(
        title="blip",
        version="0.1.0",
        summary="BLIP captioning, visual question answering and image-text matching",
        lifespan=_lifespan,
    )
    app.state.service = svc
    routes.include(app)
    _add_middleware(app, svc)
    _add_error_handlers(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The inference thread runs while the app does; models given as a loader load in the background."""
    svc: Service = app.state.service
    svc.batcher.start()
    load_task = asyncio.create_task(svc.load_models()) if svc.loader is not None else None
    try:
        yield
    finally:
        if load_task is not None and not load_task.done():
            load_task.cancel()
        await anyio.to_thread.run_sync(svc.batcher.close, svc.settings.timeout_s)
        await svc.fetcher.aclose()
        await anyio.to_thread.run_sync(svc.index_fetcher.close)


def _add_middleware(app: FastAPI, svc: Service) -> None:
    settings = svc.settings
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(
        ServeMiddleware,
        metrics=svc.metrics,
        max_body_bytes=settings.max_body_bytes,
        max_connections=settings.max_connections,
        retry_after_s=settings.retry_after_s,
        known_paths=routes.served_paths(app),
        body_timeout_s=settings.timeout_s,
        token=settings.token,
        protected_paths=routes.protected_paths(),
        token_in_body_paths=routes.TOKEN_IN_BODY_PATHS,
        error_shape=routes.error_shape,
    )


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure as `{"error": {"code", "message", "field"}}` (`blip.serve.errors`); a bug is a logged 500."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return errors.api_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return errors.validation_error(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return errors.http_error(exc)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        _logger.exception("internal error on %.64s %.*s", request.method, LOG_PATH_CHARS, request.url.path)
        return errors.error_response(500, "internal_error", "internal error; see the server log")
