"""The HTTP server: `create_app(models, settings)` returns a FastAPI app serving loaded `Blip` models.

Routes (schemas in `blip.serve.schemas`):
- `POST /score`                 Azure ML online-endpoint schema (captioning or VQA, see below)
- `POST /`, `POST /predict`     the model card's schema: several questions per image, or captions
- `POST /v1/caption|vqa|match|similarity` (JSON) and `.../upload` (multipart): our API, with scores and options
- `POST /v1/retrieve`           search a collection index (`blip serve --index NAME=DIR[@MODEL]`), see below
- `GET /v1/models`, `GET /v1/indexes`, `GET /healthz`, `GET /readyz`, `GET /metrics`, `GET /` (web page / liveness)

Every model call goes through the micro-batcher (`blip.serve.batching`) into the task functions in `blip.tasks`.

Azure ML `/score` picks its model by, in order: the `model` query parameter; the `azureml-model-deployment` header
(which Azure ML sends) when it names a loaded model; else by the columns: `["image"]` goes to the first captioning
model, `["image", "text"]` to the first VQA model (or, with none loaded, to the first captioning model). A captioning
model takes `text` as the caption's prompt (conditional captioning: "a picture of" -> "a picture of a dog ..."; an
empty text captions without one); a VQA model takes it as the question and needs the text column. Row errors name
the row: `input_data.data[3][1]`.

Collection retrieval, `POST /v1/retrieve`, over an index built by `blip batch embed` (the same search as
`blip retrieve`: ITC top-k from the index, text queries then re-ranked by the ITM match probability)::

    {"index": "photos", "text": "a red circle", "top_k": 10, "rerank": true}
    {"image": {"url": "https://..."}, "top_k": 5}          # or {"b64": ...}; the index may be left out if only one
    -> {"index": "photos", "model": "retrieval", "query": "text", "reranked": true,
        "results": [{"rank": 1, "image": "<row id>", "itc_score": 0.41, "itm_score": 0.93}, ...]}

Exactly one of `text` and `image`; `top_k` from 1 to the server's --max-top-k (default 100); `rerank` defaults to
re-ranking text queries when the model has an ITM head (true without one is refused; image queries are ranked by ITC
only). The index's model is the served model whose checkpoint embedded the collection (`blip.serve.retrieval`).
Image queries are fetched and decoded like every other image (`blip.serve.inputs`), and the search runs on the
inference thread through the micro-batcher (text queries with the same index, top_k and rerank share one call).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import os
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from blip.fetch import SafeFetcher
from blip.serve.inputs import ImageSource, from_ref, from_string, gather_all
from blip.serve.middleware import LOG_PATH_CHARS, ServeMiddleware, bounded_json_route
from blip.serve.retrieval import IndexSpec
from blip.serve.schemas import (
    AnswerOut,
    ApiError,
    AzureRequest,
    AzureResult,
    CaptionForm,
    CaptionOut,
    CaptionRequest,
    CaptionResponse,
    CaptionResult,
    CardImageResult,
    CardRequest,
    CardResponse,
    ErrorResponse,
    IndexesResponse,
    IndexOut,
    MatchResponse,
    ModelInfo,
    ModelsResponse,
    PairRequest,
    RetrieveHit,
    RetrieveRequest,
    RetrieveResponse,
    SimilarityResponse,
    StatusResponse,
    TextsForm,
    VqaForm,
    VqaParams,
    VqaRequest,
    VqaResponse,
    VqaResult,
    to_options,
)
from blip.serve.service import Service
from blip.serve.settings import ServeSettings
from blip.tasks.common import Caption
from blip.tasks.options import CaptionOptions, OptionError, VqaOptions
from blip.tasks.retrieval import RetrieveOptions

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "malformed request (e.g. body is not JSON)"},
    401: {"model": ErrorResponse, "description": "missing or wrong token (when the server has one)"},
    408: {"model": ErrorResponse, "description": "the request body did not arrive in time"},
    413: {"model": ErrorResponse, "description": "body or image too large"},
    422: {"model": ErrorResponse, "description": "invalid field, image or URL; the error names the field"},
    503: {
        "model": ErrorResponse,
        "description": "overloaded, timed out, or not ready; retry later",
        "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
    },
}
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}
STATUS_CODES.update({408: "body_timeout", 413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_request"})

bearer = HTTPBearer(auto_error=False, description="the server's token, when started with one")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
ModelQuery = Annotated[str | None, Query(description="a loaded model's name (default: the first able to)")]
AZURE_DEPLOYMENT = "azureml-model-deployment"  # the header Azure ML routes by: used when it names a loaded model
CARD_PATHS = ("/", "/predict")  # the model card's routes: the token may come in the body as secret_token
Uploads = Annotated[list[UploadFile], File(description="image files (PNG, JPEG, GIF, WebP, BMP, TIFF)")]


# --- helpers for the routes -----------------------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _caption_out(caption: Caption) -> CaptionOut:
    return CaptionOut(text=caption.text, score=_finite(caption.score), token_ids=list(caption.token_ids))


def _pairing(n_images: int, n_texts: int) -> list[int]:
    """image index per text for match: one image with each text, each image with one text, or pairwise."""
    if n_images == 1:
        return [0] * n_texts
    if n_texts == 1 or n_images == n_texts:
        return list(range(n_images))
    raise ApiError(
        422,
        "invalid_request",
        f"texts: {n_images} images but {n_texts} texts: give one image, one text, or lists of the same length",
        field="texts",
    )


async def _read_uploads(files: list[UploadFile], limit: int) -> list[ImageSource]:
    sources = []
    for i, upload in enumerate(files):
        data = await upload.read(limit + 1)
        sources.append(ImageSource(f"images[{i}]", "bytes", data))
    return sources


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    field = _field_path(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        message = f"body: not valid JSON ({reason})" if reason else "body: not valid JSON"
        return _error_response(400, "malformed_json", message, "body")
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    message = f"{field}: {msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return _error_response(422, "invalid_request", message, field)


def _error_response(
    status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def _page() -> tuple[str, str]:
    """The web page, and a Content-Security-Policy allowing exactly its inline script and style."""
    try:
        html = PAGE.read_text(encoding="utf-8")
    except OSError:
        html = "<!doctype html><title>blip</title><p>The web page is not installed; the API is at /docs.</p>"
    hashes = []
    for tag in ("script", "style"):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        digests = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)
        hashes.append(digests or "'none'")
    csp = (
        f"default-src 'none'; script-src {hashes[0]}; style-src {hashes[1]}; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, csp


# --- the app --------------------------------------------------------------------------------------------------------


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
    page, csp = _page()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.batcher.start()
        load_task = asyncio.create_task(svc.load_models()) if loader is not None else None
        try:
            yield
        finally:
            if load_task is not None and not load_task.done():
                load_task.cancel()
            await anyio.to_thread.run_sync(svc.batcher.close, settings.timeout_s)
            await svc.fetcher.aclose()

    app = FastAPI(
        title="blip",
        version="0.1.0",
        summary="BLIP captioning, visual question answering and image-text matching",
        lifespan=lifespan,
    )
    app.state.service = svc
    app.router.route_class = bounded_json_route(settings.max_json_depth, settings.max_json_items, settings.token)
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
        known_paths=lambda: {getattr(r, "path", "") for r in app.routes},
        body_timeout_s=settings.timeout_s,
        token=settings.token,
        protected_paths=lambda: {
            r.path
            for r in app.routes
            if isinstance(r, APIRoute) and any(d.dependency is require_auth for d in r.dependencies)
        },
        token_in_body_paths=CARD_PATHS,
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "error")
        field = "body" if exc.status_code in (400, 408, 413) else "Authorization" if exc.status_code == 401 else None
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and field:
            message = message if message.startswith("body") else f"body: {message}"
        return _error_response(exc.status_code, code, message, field, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        _logger.exception("internal error on %.64s %.*s", request.method, LOG_PATH_CHARS, request.url.path)
        return _error_response(500, "internal_error", "internal error; see the server log")

    async def require_auth(credentials: Credentials) -> None:
        svc.authorize(credentials)

    auth = [Depends(require_auth)]

    # --- service routes ----------------------------------------------------------------------------------------------

    @app.get(
        "/",
        response_model=StatusResponse,
        tags=["service"],
        summary="web page (Accept: text/html) or liveness (JSON)",
        responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}},
    )
    async def index(request: Request) -> Any:
        if "text/html" in request.headers.get("accept", ""):
            return HTMLResponse(page, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"})
        if not svc.loaded:
            return StatusResponse(status="ok")
        return StatusResponse(status="ok", models=sorted(svc.models), indexes=sorted(svc.indexes))

    @app.get(
        "/healthz",
        response_model=StatusResponse,
        tags=["service"],
        summary="the process is alive; lists the models and indexes loaded so far (/readyz: whether it takes work)",
    )
    async def healthz() -> StatusResponse:
        return StatusResponse(status="ok", models=sorted(svc.models), indexes=sorted(svc.indexes))

    @app.get(
        "/readyz",
        response_model=StatusResponse,
        tags=["service"],
        summary="200 when the models and indexes are loaded and requests are taken, else 503",
        responses={503: {"model": StatusResponse, "description": "not ready"}},
    )
    async def readyz() -> Any:
        if svc.ready:
            return StatusResponse(status="ready", models=sorted(svc.models), indexes=sorted(svc.indexes))
        body = StatusResponse(status="not ready", reason=svc.not_ready_reason())
        return JSONResponse(body.model_dump(), status_code=503, headers=svc.retry_headers())

    @app.get(
        "/metrics",
        tags=["service"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get(
        "/v1/models", response_model=ModelsResponse, tags=["blip"], responses={401: ERRORS[401]}, dependencies=auth
    )
    async def list_models() -> ModelsResponse:
        infos = [
            ModelInfo(name=n, kind=str(m.config.kind), tasks=sorted(m.tasks), source=m.source)
            for n, m in (svc.models.items() if svc.loaded else [])
        ]
        return ModelsResponse(models=infos)

    @app.get(
        "/v1/indexes", response_model=IndexesResponse, tags=["blip"], responses={401: ERRORS[401]}, dependencies=auth
    )
    async def list_indexes() -> IndexesResponse:
        """The collection indexes /v1/retrieve searches, with the model that embedded each."""
        infos = [
            IndexOut(
                name=name,
                model=served.model,
                count=served.count,
                dim=served.collection.index.info.dim,
                kind=served.collection.index.info.kind,
                backend=served.collection.index.info.backend,
            )
            for name, served in (svc.indexes.items() if svc.loaded else [])
        ]
        return IndexesResponse(indexes=infos)

    # --- Azure ML schema ---------------------------------------------------------------------------------------------

    def azure_target(model: str | None, deployment: str | None, with_text: bool) -> tuple[str, Blip, str]:
        """(name, model, task) for /score: the named model's own task, else the first model for the columns."""
        name = model or None  # ?model= (empty) as if not given
        loaded = svc.models if svc.ready else {}
        if name is None and deployment in loaded:
            name = deployment
        if name in loaded:
            tasks = loaded[name].tasks
            if "caption" not in tasks and "vqa" in tasks and not with_text:
                message = f'model {name!r} answers questions: send columns ["image", "text"]'
                raise svc.invalid("input_data.columns", message)
            task = "caption" if "caption" in tasks else "vqa"
        elif name is None and with_text and any("vqa" in m.tasks for m in loaded.values()):
            task = "vqa"
        else:
            task = "caption"
        resolved, blip = svc.resolve(name, task)
        return resolved, blip, task

    async def azure_captions(
        name: str, blip: Blip, sources: list[ImageSource], prompts: list[str | None]
    ) -> list[AzureResult]:
        """Rows with the same prompt go to the model together; a prompt's errors name its first row."""
        groups: dict[str | None, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(i)
        params: dict[str | None, CaptionOptions] = {}
        for prompt, rows in groups.items():
            try:
                params[prompt] = CaptionOptions(prompt=prompt)
            except OptionError as e:
                message = str(e).removeprefix(f"{e.field}: ")
                raise svc.invalid(f"input_data.data[{rows[0]}][1]", f"as a prompt: {message}") from e

        async def caption_group(prompt: str | None, rows: list[int]) -> list[list[Caption]]:
            try:
                return await svc.caption(name, blip, params[prompt], [sources[i] for i in rows], "input_data.data")
            except ApiError as e:
                if prompt is None or e.field not in ("prompt", "max_new_tokens"):
                    raise
                message = e.message.removeprefix(f"{e.field}: ")
                raise svc.invalid(f"input_data.data[{rows[0]}][1]", f"as a prompt: {message}") from e

        results = await gather_all([caption_group(p, rows) for p, rows in groups.items()])
        texts: list[str] = [""] * len(sources)
        for rows, captions in zip(groups.values(), results):
            for i, caption in zip(rows, captions):
                texts[i] = caption[0].text
        return [AzureResult(text=t) for t in texts]

    @app.post(
        "/score",
        response_model=list[AzureResult],
        tags=["Azure ML"],
        responses=ERRORS,
        summary='Azure ML online endpoint: columns ["image"] captions, ["image", "text"] answers (or prompts)',
        dependencies=auth,
    )
    async def score(
        body: AzureRequest,
        model: ModelQuery = None,
        deployment: Annotated[
            str | None,
            Header(
                alias=AZURE_DEPLOYMENT,
                description="Azure ML's deployment name: picks the model when it names a loaded one",
            ),
        ] = None,
    ) -> list[AzureResult]:
        """Captions (`["image"]`, or `["image", "text"]` with a captioning model: text is the prompt) or answers
        (`["image", "text"]` with a VQA model). The model: `?model=`, else the `azureml-model-deployment` header when
        it names a loaded model, else the first that fits the columns (VQA for a text column, when one is loaded)."""
        data = body.input_data
        columns = data.columns
        if columns not in (["image"], ["image", "text"]):
            raise svc.invalid("input_data.columns", f'expected ["image"] or ["image", "text"], got {columns}')
        if data.index is not None and len(data.index) != len(data.data):
            raise svc.invalid("input_data.index", f"{len(data.index)} ids for {len(data.data)} rows")
        for i, row in enumerate(data.data):
            if len(row) != len(columns):
                message = f"expected {len(columns)} values ({columns}), got {len(row)}"
                raise svc.invalid(f"input_data.data[{i}]", message)
        with_text = columns == ["image", "text"]
        name, blip, task = azure_target(model, deployment, with_text)
        sources = [from_string(row[0], f"input_data.data[{i}][0]") for i, row in enumerate(data.data)]
        texts = [row[1] for row in data.data] if with_text else [""] * len(sources)
        svc.check_texts([(f"input_data.data[{i}][1]", t) for i, t in enumerate(texts)])
        if task == "caption":
            svc.check_count(len(sources), svc.settings.max_images, "input_data.data", "images")
            return await azure_captions(name, blip, sources, [t if t.strip() else None for t in texts])
        svc.check_count(len(sources), svc.settings.max_texts, "input_data.data", "rows")
        svc.check_count(len({s.value for s in sources}), svc.settings.max_images, "input_data.data", "distinct images")
        for i, question in enumerate(texts):
            if not question.strip():
                raise svc.invalid(f"input_data.data[{i}][1]", "the question is empty")
        options = svc.vqa_options(VqaOptions(), blip)
        answers = await svc.answer(name, options, sources, texts, list(range(len(texts))))
        return [AzureResult(text=a.text) for a in answers]

    # --- the model card's schema -------------------------------------------------------------------------------------

    async def predict(body: CardRequest, credentials: Credentials, model: ModelQuery = None) -> CardResponse:
        svc.authorize(credentials, body.secret_token)
        inputs = body.inputs
        sources = [from_ref(ref, f"inputs.images[{i}]") for i, ref in enumerate(inputs.images)]
        if inputs.texts is None:
            name, blip = svc.resolve(model, "caption", field="inputs.texts")
            captions = await svc.caption(name, blip, CaptionOptions(), sources, field="inputs.images")
            return CardResponse(captions=[CardImageResult(image_results=[c[0].text]) for c in captions])
        if len(inputs.texts) != len(inputs.images):
            message = f"{len(inputs.texts)} question lists for {len(inputs.images)} images (texts[i]: images[i])"
            raise svc.invalid("inputs.texts", message)
        name, blip = svc.resolve(model, "vqa", field="inputs.texts")
        svc.check_count(len(sources), svc.settings.max_images, "inputs.images", "images")
        questions = [q for group in inputs.texts for q in group]
        image_of = [i for i, group in enumerate(inputs.texts) for _ in group]
        svc.check_count(len(questions), svc.settings.max_texts, "inputs.texts", "questions")
        svc.check_texts([(f"inputs.texts[{i}][{j}]", q) for i, g in enumerate(inputs.texts) for j, q in enumerate(g)])
        options = svc.vqa_options(VqaOptions(), blip)
        answers = await svc.answer(name, options, sources, questions, image_of)
        results: list[list[str]] = [[] for _ in inputs.images]
        for image, answer in zip(image_of, answers):
            results[image].append(answer.text)
        return CardResponse(captions=[CardImageResult(image_results=r) for r in results])

    for path in ("/", "/predict"):
        app.add_api_route(
            path,
            predict,
            methods=["POST"],
            response_model=CardResponse,
            tags=["model card"],
            responses=ERRORS,
            summary="model-card schema: texts[i] are the questions about images[i]; no texts: captions",
            operation_id=f"predict{path.replace('/', '_')}",
        )

    # --- our API -----------------------------------------------------------------------------------------------------

    async def caption_route(
        params: CaptionRequest | CaptionForm, model: str | None, sources: list[ImageSource]
    ) -> CaptionResponse:
        name, blip = svc.resolve(model, "caption")
        options = svc.options(lambda: to_options(params, CaptionOptions))
        captions = await svc.caption(name, blip, options, sources)
        return CaptionResponse(
            model=name, results=[CaptionResult(captions=[_caption_out(c) for c in per]) for per in captions]
        )

    @app.post("/v1/caption", response_model=CaptionResponse, tags=["blip"], responses=ERRORS, dependencies=auth)
    async def caption(body: CaptionRequest) -> CaptionResponse:
        """Captions with scores and token ids; `num_captions` per image."""
        sources = [from_ref(ref, f"images[{i}]") for i, ref in enumerate(body.images)]
        return await caption_route(body, body.model, sources)

    @app.post("/v1/caption/upload", response_model=CaptionResponse, tags=["blip"], responses=ERRORS, dependencies=auth)
    async def caption_upload(form: Annotated[CaptionForm, Form()], images: Uploads) -> CaptionResponse:
        """/v1/caption with images uploaded as multipart files."""
        svc.check_count(len(images), svc.settings.max_images, "images", "images")
        return await caption_route(form, form.model, await _read_uploads(images, svc.settings.fetch_max_bytes))

    async def vqa_route(
        params: VqaParams | VqaForm, model: str | None, sources: list[ImageSource], groups: list[list[str]]
    ) -> VqaResponse:
        name, blip = svc.resolve(model, "vqa")
        svc.check_count(len(sources), svc.settings.max_images, "images", "images")
        questions = [q for group in groups for q in group]
        image_of = [i for i, group in enumerate(groups) for _ in group]
        svc.check_count(len(questions), svc.settings.max_texts, "questions", "questions")
        svc.check_texts([(f"questions[{i}][{j}]", q) for i, g in enumerate(groups) for j, q in enumerate(g)])
        options = svc.vqa_options(svc.options(lambda: to_options(params, VqaOptions)), blip)
        answers = await svc.answer(name, options, sources, questions, image_of)
        results: list[list[AnswerOut]] = [[] for _ in sources]
        for image, question, answer in zip(image_of, questions, answers):
            score = _finite(answer.score)
            results[image].append(
                AnswerOut(question=question, text=answer.text, score=score, token_ids=answer.token_ids)
            )
        return VqaResponse(model=name, results=[VqaResult(answers=r) for r in results])

    @app.post("/v1/vqa", response_model=VqaResponse, tags=["blip"], responses=ERRORS, dependencies=auth)
    async def vqa(body: VqaRequest) -> VqaResponse:
        """Answers with scores: `questions[i]` are the questions about `images[i]`; each image is encoded once."""
        if len(body.questions) != len(body.images):
            raise svc.invalid("questions", f"{len(body.questions)} question lists for {len(body.images)} images")
        sources = [from_ref(ref, f"images[{i}]") for i, ref in enumerate(body.images)]
        return await vqa_route(body, body.model, sources, body.questions)

    @app.post("/v1/vqa/upload", response_model=VqaResponse, tags=["blip"], responses=ERRORS, dependencies=auth)
    async def vqa_upload(form: Annotated[VqaForm, Form()], images: Uploads) -> VqaResponse:
        """/v1/vqa with multipart files; every `questions` field is asked about every uploaded image."""
        svc.check_count(len(images), svc.settings.max_images, "images", "images")
        sources = await _read_uploads(images, svc.settings.fetch_max_bytes)
        return await vqa_route(form, form.model, sources, [list(form.questions) for _ in sources])

    async def match_route(model: str | None, sources: list[ImageSource], texts: list[str]) -> MatchResponse:
        name, _ = svc.resolve(model, "match")
        svc.check_count(len(sources), svc.settings.max_images, "images", "images")
        svc.check_count(len(texts), svc.settings.max_texts, "texts", "texts")
        svc.check_texts([(f"texts[{i}]", t) for i, t in enumerate(texts)])
        image_of = _pairing(len(sources), len(texts))
        texts = texts * len(sources) if len(texts) == 1 and len(sources) > 1 else texts
        scores = await svc.match(name, sources, texts, image_of)
        return MatchResponse(model=name, scores=scores)

    @app.post("/v1/match", response_model=MatchResponse, tags=["blip"], responses=ERRORS, dependencies=auth)
    async def match(body: PairRequest) -> MatchResponse:
        """ITM probability that image and text match: one image with each text, or pairwise."""
        sources = [from_ref(ref, f"images[{i}]") for i, ref in enumerate(body.images)]
        return await match_route(body.model, sources, list(body.texts))

    @app.post("/v1/match/upload", response_model=MatchResponse, tags=["blip"], responses=ERRORS, dependencies=auth)
    async def match_upload(form: Annotated[TextsForm, Form()], images: Uploads) -> MatchResponse:
        svc.check_count(len(images), svc.settings.max_images, "images", "images")
        sources = await _read_uploads(images, svc.settings.fetch_max_bytes)
        return await match_route(form.model, sources, list(form.texts))

    async def similarity_route(model: str | None, sources: list[ImageSource], texts: list[str]) -> SimilarityResponse:
        name, _ = svc.resolve(model, "similarity")
        svc.check_count(len(sources), svc.settings.max_images, "images", "images")
        svc.check_count(len(texts), svc.settings.max_texts, "texts", "texts")
        svc.check_texts([(f"texts[{i}]", t) for i, t in enumerate(texts)])
        return SimilarityResponse(model=name, scores=await svc.similarity(name, sources, texts))

    @app.post("/v1/similarity", response_model=SimilarityResponse, tags=["blip"], responses=ERRORS, dependencies=auth)
    async def similarity(body: PairRequest) -> SimilarityResponse:
        """ITC cosine similarity of every image with every text."""
        sources = [from_ref(ref, f"images[{i}]") for i, ref in enumerate(body.images)]
        return await similarity_route(body.model, sources, list(body.texts))

    @app.post(
        "/v1/similarity/upload", response_model=SimilarityResponse, tags=["blip"], responses=ERRORS, dependencies=auth
    )
    async def similarity_upload(form: Annotated[TextsForm, Form()], images: Uploads) -> SimilarityResponse:
        svc.check_count(len(images), svc.settings.max_images, "images", "images")
        sources = await _read_uploads(images, svc.settings.fetch_max_bytes)
        return await similarity_route(form.model, sources, list(form.texts))

    @app.post("/v1/retrieve", response_model=RetrieveResponse, tags=["blip"], responses=ERRORS, dependencies=auth)
    async def retrieve(body: RetrieveRequest) -> RetrieveResponse:
        """Search a collection index (`blip serve --index`) with a text or an image: the ITC top_k, text queries
        re-ranked by ITM (both scores returned), as `blip retrieve` does."""
        served = svc.resolve_index(body.index)
        blip = svc.models[served.model]
        if body.text is None and body.image is None:
            raise svc.invalid("text", "give a query: 'text' (images matching it) or 'image' (images similar to it)")
        if body.text is not None and body.image is not None:
            raise svc.invalid("image", "give one query: 'text' or 'image', not both")
        svc.check_top_k(body.top_k)
        if body.image is not None:
            if body.rerank:
                raise svc.invalid(
                    "rerank", "image queries are ranked by ITC similarity only (ITM scores image-text pairs)"
                )
            rerank = False
        else:
            svc.check_texts([("text", body.text or "")])
            rerank = "itm" in blip.tasks if body.rerank is None else body.rerank
            if rerank and "itm" not in blip.tasks:
                message = f"model {served.model!r} of index {served.name!r} has no ITM head to re-rank with ({blip!r})"
                raise svc.invalid("rerank", f"{message}; send rerank: false")
        query = "image" if body.image is not None else "text"
        options = RetrieveOptions(served.name, query, body.top_k, rerank)
        image = from_ref(body.image, "image") if body.image is not None else None
        hits = await svc.retrieve(served, options, body.text, image)
        results = [
            RetrieveHit(rank=h.rank, image=h.image, itc_score=h.itc, itm_score=h.itm if rerank else None) for h in hits
        ]
        return RetrieveResponse(index=served.name, model=served.model, query=query, reranked=rerank, results=results)

    return app
