"""The ASGI layer around the app: request ids, a cap on requests in progress (503 past it), a cap on body size
(413) and on the time the body takes to arrive (408), Prometheus request metrics and one structured JSON access-log
line per request."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from blip.serve.metrics import ServerMetrics

_logger = logging.getLogger(__name__)
access_logger = logging.getLogger("blip.serve.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # always answered, even when busy
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the cap; FastAPI lets HTTPExceptions through its body parsing."""

    def __init__(self, limit: int):
        super().__init__(413, f"body: the request body is over the limit of {limit} bytes")
        self.limit = limit


class BodyTimeout(HTTPException):
    """Raised from `receive` when the body is not complete in time (a slow or stalled client)."""

    def __init__(self, seconds: float):
        super().__init__(408, f"body: the request body did not arrive within {seconds:g} s")


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()


class ServeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServerMetrics,
        max_body_bytes: int,
        max_connections: int,
        retry_after_s: int = 1,
        known_paths: Callable[[], set[str]] = set,
        body_timeout_s: float = 30.0,
    ):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.retry_after_s = retry_after_s
        self.known_paths = known_paths
        self.body_timeout_s = body_timeout_s
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given_id = headers.get("x-request-id", "")
        request_id = given_id if REQUEST_ID.match(given_id) else uuid.uuid4().hex[:16]
        info: dict[str, Any] = {"status": 0, "bytes_out": 0, "bytes_in": 0}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                extra = [(b"x-request-id", request_id.encode()), (b"x-content-type-options", b"nosniff")]
                message["headers"] = list(message.get("headers", [])) + extra
            elif message["type"] == "http.response.body":
                info["bytes_out"] += len(message.get("body", b""))
            await send(message)

        path = scope.get("path", "")
        exempt = path in EXEMPT_PATHS
        try:
            if not exempt and self.active >= self.max_connections:
                self.metrics.rejected.inc(reason="connections")
                await self._reply(
                    send_wrapper,
                    503,
                    error_body("overloaded", f"too many requests in progress (limit {self.max_connections})"),
                    retry=True,
                )
                return
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                self.metrics.rejected.inc(reason="body_size")
                message = f"body: the request body is {declared} bytes, over the limit of {self.max_body_bytes}"
                await self._reply(send_wrapper, 413, error_body("body_too_large", message, "body"))
                return
            self.active += 1
            try:
                await self.app(scope, self._capped(receive, info), send_wrapper)
            except (BodyTooLarge, BodyTimeout) as e:
                too_large = isinstance(e, BodyTooLarge)
                self.metrics.rejected.inc(reason="body_size" if too_large else "body_timeout")
                if info["status"] == 0:
                    code = "body_too_large" if too_large else "body_timeout"
                    await self._reply(send_wrapper, e.status_code, error_body(code, e.detail, "body"))
            finally:
                self.active -= 1
        finally:
            self._record(scope, path, info, request_id, time.perf_counter() - start)

    def _capped(self, receive: Receive, info: dict[str, Any]) -> Receive:
        """`receive` with the body capped in size and in time (until its last part; later calls pass through)."""
        deadline = time.monotonic() + self.body_timeout_s
        complete = False

        async def wrapped() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                info["bytes_in"] += len(message.get("body", b""))
                if info["bytes_in"] > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        return wrapped

    async def _reply(self, send: Send, status: int, body: bytes, retry: bool = False) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope: Scope, path: str, info: dict[str, Any], request_id: str, seconds: float) -> None:
        route = scope.get("route")
        route_path = getattr(route, "path", None) or (path if path in self.known_paths() else "unmatched")
        method = scope.get("method", "")
        status = info["status"] or 500
        self.metrics.requests.inc(route=route_path, method=method, status=str(status))
        self.metrics.latency.observe(seconds, route=route_path)
        client = scope.get("client") or ("", 0)
        access_logger.info(
            json.dumps(
                {
                    "event": "request",
                    "request_id": request_id,
                    "method": method,
                    "path": path,
                    "route": route_path,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                    "bytes_in": info["bytes_in"],
                    "bytes_out": info["bytes_out"],
                    "client": f"{client[0]}:{client[1]}",
                }
            )
        )
