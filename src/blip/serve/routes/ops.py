"""Operating the server: `GET /` (the web page for a browser, liveness for anything else), `/healthz`, `/readyz`
and `/metrics` (Prometheus)."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from blip.serve.routes.shared import ServiceDep, api_router
from blip.serve.schemas import StatusResponse
from blip.serve.service import Service

PAGE = Path(__file__).parent.parent / "static" / "index.html"

router = api_router("service")


@functools.cache
def web_page() -> tuple[str, str]:
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


def _status(svc: Service, status: str) -> StatusResponse:
    return StatusResponse(status=status, models=sorted(svc.models), indexes=sorted(svc.indexes))


@router.get(
    "/",
    response_model=StatusResponse,
    summary="web page (Accept: text/html) or liveness (JSON)",
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}},
)
async def index(request: Request, svc: ServiceDep) -> Any:
    if "text/html" in request.headers.get("accept", ""):
        page, csp = web_page()
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"})
    return _status(svc, "ok") if svc.loaded else StatusResponse(status="ok")


@router.get(
    "/healthz",
    response_model=StatusResponse,
    summary="the process is alive; lists the models and indexes loaded so far (/readyz: whether it takes work)",
)
async def healthz(svc: ServiceDep) -> StatusResponse:
    return _status(svc, "ok")


@router.get(
    "/readyz",
    response_model=StatusResponse,
    summary="200 when the models and indexes are loaded and requests are taken, else 503",
    responses={503: {"model": StatusResponse, "description": "not ready"}},
)
async def readyz(svc: ServiceDep) -> Any:
    if svc.ready:
        return _status(svc, "ready")
    body = StatusResponse(status="not ready", reason=svc.not_ready_reason())
    return JSONResponse(body.model_dump(), status_code=503, headers=svc.retry_headers())


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(svc: ServiceDep) -> PlainTextResponse:
    return PlainTextResponse(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
