"""The server's routes, one module per API over the one `Service` (`app.state.service`):

- `ops`    `GET /` (web page / liveness), `/healthz`, `/readyz`, `/metrics`
- `v1`     `POST /v1/caption|vqa|match|similarity|embed` (+ `/upload`), `/v1/retrieve`; `GET /v1/models`, `/v1/indexes`
- `azure`  `POST /score` (Azure ML online endpoint)
- `card`   `POST /`, `POST /predict` (the model card's schema)
- `explain` `POST /v1/explain` (ITM Grad-CAM maps as PNGs)
- `hf`     `POST /hf`, `POST /hf/{model}` (the Hugging Face Inference API, for huggingface_hub's InferenceClient)
- `openai` `POST /v1/chat/completions` (the OpenAI API, for the openai client)

`shared` holds what they share (the service dependency, auth, uploads, answering groups of questions); the checks
and the model calls are the service's. `ROUTERS` is in the order of the API docs (/docs groups by tag, in order of
first appearance)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute

from blip.serve.errors import ErrorShape, standard_shape
from blip.serve.routes import azure, card, explain, hf, openai, ops, v1
from blip.serve.routes.shared import require_auth

ROUTERS = (ops.router, v1.router, azure.router, card.router, explain.router, hf.router, openai.router)
TOKEN_IN_BODY_PATHS = card.PATHS


def error_shape(path: str) -> ErrorShape:
    """How errors on `path` are worded: the Hugging Face and OpenAI routes as their clients expect, else ours."""
    if path == hf.PREFIX or path.startswith(f"{hf.PREFIX}/"):
        return hf.error_shape
    if path == openai.PATH:
        return openai.error_shape
    return standard_shape


def include(app: FastAPI) -> None:
    for router in ROUTERS:
        app.include_router(router)


def api_routes() -> list[APIRoute]:
    return [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]


def served_paths(app: FastAPI) -> frozenset[str]:
    """Every path `app` answers: its own routes (/docs, /openapi.json) and the routers' (FastAPI keeps an included
    router as one entry of `app.routes`)."""
    return frozenset({getattr(r, "path", "") for r in app.routes} | {r.path for r in api_routes()}) - {""}


def protected_paths() -> frozenset[str]:
    """Paths whose routes need the token (checked by the middleware before the body is read)."""
    return frozenset(r.path for r in api_routes() if any(d.dependency is require_auth for d in r.dependencies))
