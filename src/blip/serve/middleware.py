"""The ASGI layer around the app: request ids, a cap on requests in progress (503 past it), authentication before
the body is read, a cap on body size (413) and on the time the body takes to arrive (408), Prometheus request
metrics and one structured JSON access-log line per request; and the routes' JSON parsing (`BoundedJsonRoute`).

Authentication comes first: when the server has a token, a route that needs it answers 401 at once unless the
request carries `Authorization: Bearer <token>` (its body is never read). The model card's routes (`POST /` and
`/predict`) may carry the token in the body as `secret_token` instead: without a valid bearer header their body is
parsed (bounded as below, off the event loop when large) and then checked; a body that is malformed or too complex
to parse answers 401 too.

JSON bodies are parsed with a cap on nesting depth and on the number of values (`check_json_shape`, 413 past
either), in a worker thread when larger than `THREAD_PARSE_BYTES`, so `[],[],...` cannot make millions of objects.
The caps and the token are the app's service's settings (`app.state.service.settings`), read per request, so one
route class serves every app.

Everything taken from the request line into metrics labels and log fields is bounded: an unknown method is counted
as OTHER and logged cut to `LOG_FIELD_CHARS`, the path is logged cut, and the route label is a route's template or
"unmatched"."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

import anyio
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from blip.serve.errors import ErrorShape, error_body
from blip.serve.metrics import ServerMetrics
from blip.serve.settings import ServeSettings

_logger = logging.getLogger(__name__)
access_logger = logging.getLogger("blip.serve.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # always answered, even when busy
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"})
LOG_FIELD_CHARS = 64  # request-line values in the access log: methods
LOG_PATH_CHARS = 512
AUTH_SCOPE_KEY = "blip.auth"  # "secret_token": the route must find the token in its JSON body
THREAD_PARSE_BYTES = 64 * 1024  # JSON bodies larger than this are parsed in a worker thread
STRUCTURE = re.compile(rb'[\[\]{},"]')
STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+"')  # a JSON string after its opening quote


def _bounded(value: str, limit: int) -> str:
    return value if len(value) <= limit else f"{value[:limit]}...({len(value)} chars)"


def method_label(method: str) -> str:
    """The method as a metrics label: one of the standard methods, or OTHER."""
    return method if method in METHODS else "OTHER"


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this type as JSON: no type, application/json or application/*+json."""
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison, encoded as the service's own check does."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode())


def bearer_token(authorization: str | None) -> str | None:
    """The credentials of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    scheme, _, credentials = (authorization or "").partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None


class JsonTooComplex(HTTPException):
    """A JSON body nested deeper or holding more values than the server parses (raised before parsing)."""

    def __init__(self, message: str):
        super().__init__(413, f"body: {message}")


def check_json_shape(body: bytes, max_depth: int, max_items: int) -> None:
    """Raise `JsonTooComplex` if `body` nests deeper than `max_depth` or holds more than `max_items` values (counted
    as commas and opened arrays/objects outside strings). Cheap for ordinary bodies (three byte counts: the structural
    characters anywhere bound those outside strings); otherwise a scan that stops as soon as a cap is passed, so a
    body of millions of values costs as much as `max_items` of them. Malformed JSON is left to the parser."""
    opens = body.count(b"[") + body.count(b"{")
    if opens <= max_depth and opens + body.count(b",") <= max_items:
        return
    depth = items = 0
    position = 0
    while (found := STRUCTURE.search(body, position)) is not None:
        at = found.start()
        char = body[at]
        if char == 0x22:  # a string: skip to its closing quote
            rest = STRING_REST.match(body, at + 1)
            if rest is None:
                return  # unterminated: the parser will say so
            position = rest.end()
            continue
        if char in (0x5B, 0x7B):  # [ {
            depth += 1
            items += 1
            if depth > max_depth:
                raise JsonTooComplex(f"the JSON nests deeper than {max_depth} levels")
        elif char in (0x5D, 0x7D):  # ] }
            depth -= 1
        else:
            items += 1
        if items > max_items:
            raise JsonTooComplex(f"the JSON holds more than {max_items} values")
        position = at + 1


def parse_json(body: bytes, max_depth: int, max_items: int) -> Any:
    """The JSON value of a UTF-8 body (RFC 8259), its shape checked first. UTF-8 only: in it the bytes the check
    counts mean what they say (in UTF-16 a `"` byte can be half of another character, hiding structure from it)."""
    check_json_shape(body, max_depth, max_items)
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise json.JSONDecodeError(f"not UTF-8 ({e.reason} at byte {e.start})", "", 0) from None
    return json.loads(text)


class BoundedJsonRequest(Request):
    """A request whose JSON body is parsed by `parse_json` under the server's caps (in a worker thread when large)
    and, when the middleware marked it (the model card's `secret_token`), checked for the token."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = await self._parse(await self.body(), self.app.state.service.settings)
        return self._json

    async def _parse(self, body: bytes, settings: ServeSettings) -> Any:
        limits = (settings.max_json_depth, settings.max_json_items)
        token = settings.token
        needs_token = token is not None and self.scope.get(AUTH_SCOPE_KEY) == "secret_token"
        try:
            if len(body) > THREAD_PARSE_BYTES:
                parsed = await anyio.to_thread.run_sync(parse_json, body, *limits)
            else:
                parsed = parse_json(body, *limits)
        except (ValueError, JsonTooComplex):  # json.JSONDecodeError is a ValueError
            if needs_token:
                raise Unauthorized() from None
            raise
        if needs_token:
            given = parsed.get("secret_token") if isinstance(parsed, dict) else None
            if not isinstance(given, str) or not token_matches(given, token or ""):
                raise Unauthorized()
        return parsed


class BoundedJsonRoute(APIRoute):
    """The routes' class: their handlers see a `BoundedJsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def bounded_handler(request: Request) -> Response:
            return await handler(BoundedJsonRequest(request.scope, request.receive))

        return bounded_handler


class Unauthorized(HTTPException):
    def __init__(self) -> None:
        super().__init__(401, UNAUTHORIZED_MESSAGE, headers={"WWW-Authenticate": "Bearer"})


UNAUTHORIZED_MESSAGE = "Authorization: missing or wrong bearer token"


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the cap; FastAPI lets HTTPExceptions through its body parsing."""

    def __init__(self, limit: int):
        super().__init__(413, f"body: the request body is over the limit of {limit} bytes")
        self.limit = limit


class BodyTimeout(HTTPException):
    """Raised from `receive` when the body is not complete in time (a slow or stalled client)."""

    def __init__(self, seconds: float):
        super().__init__(408, f"body: the request body did not arrive within {seconds:g} s")


class ServeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServerMetrics,
        max_body_bytes: int,
        max_connections: int,
        retry_after_s: int = 1,
        known_paths: Collection[str] = (),
        body_timeout_s: float = 30.0,
        token: str | None = None,
        protected_paths: Collection[str] = (),
        token_in_body_paths: Collection[str] = (),
        error_shape: Callable[[str], ErrorShape] | None = None,
    ):
        """`known_paths`: every path the app serves (a metrics label even when no route matched the method);
        `protected_paths`: paths that need the token; `token_in_body_paths`: POST paths whose JSON body may carry it
        as `secret_token` instead; `error_shape`: the error shape of a path (default: the standard one)."""
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.retry_after_s = retry_after_s
        self.known_paths = frozenset(known_paths)
        self.body_timeout_s = body_timeout_s
        self.token = token
        self.protected_paths = frozenset(p for p in protected_paths if "{" not in p)
        # paths with parameters (/hf/{model}) as their routes match them
        self.protected_templates = [compile_path(p)[0] for p in protected_paths if "{" in p]
        self.token_in_body_paths = frozenset(token_in_body_paths)
        self.error_shape = error_shape
        self.active = 0

    def _error(self, path: str, status: int, code: str, message: str, field: str | None) -> tuple[int, bytes]:
        """(status, body) of an error answered here, in the shape of the API `path` belongs to."""
        if self.error_shape is None:
            return status, error_body(code, message, field)
        status, content = self.error_shape(path)(status, code, message, field)
        return status, json.dumps(content).encode()

    def _authenticate(self, scope: Scope, method: str, path: str, headers: dict[str, str]) -> bool:
        """False: answer 401 now. Marks a model-card request without a valid bearer header for the body check."""
        if self.token is None or method == "OPTIONS":  # a CORS preflight has no credentials; the request after it has
            return True
        if token_matches(bearer_token(headers.get("authorization")), self.token):
            return True
        if method == "POST" and path in self.token_in_body_paths:
            if not is_json(headers.get("content-type")):
                return False  # only a JSON body can carry secret_token
            scope[AUTH_SCOPE_KEY] = "secret_token"
            return True
        return path not in self.protected_paths and not any(t.match(path) for t in self.protected_templates)

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
                message = f"too many requests in progress (limit {self.max_connections})"
                await self._reply(send_wrapper, *self._error(path, 503, "overloaded", message, None), retry=True)
                return
            if not self._authenticate(scope, scope.get("method", ""), path, headers):
                self.metrics.rejected.inc(reason="unauthorized")
                status, body = self._error(path, 401, "unauthorized", UNAUTHORIZED_MESSAGE, "Authorization")
                await self._reply(send_wrapper, status, body, extra=[(b"www-authenticate", b"Bearer")])
                return
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                self.metrics.rejected.inc(reason="body_size")
                message = f"body: the request body is {declared} bytes, over the limit of {self.max_body_bytes}"
                await self._reply(send_wrapper, *self._error(path, 413, "body_too_large", message, "body"))
                return
            self.active += 1
            try:
                await self.app(scope, self._capped(receive, info), send_wrapper)
            except (BodyTooLarge, BodyTimeout) as e:
                too_large = isinstance(e, BodyTooLarge)
                self.metrics.rejected.inc(reason="body_size" if too_large else "body_timeout")
                if info["status"] == 0:
                    code = "body_too_large" if too_large else "body_timeout"
                    await self._reply(send_wrapper, *self._error(path, e.status_code, code, e.detail, "body"))
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

    async def _reply(
        self, send: Send, status: int, body: bytes, retry: bool = False, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        headers.extend(extra or [])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope: Scope, path: str, info: dict[str, Any], request_id: str, seconds: float) -> None:
        route = scope.get("route")
        route_path = getattr(route, "path", None) or (path if path in self.known_paths else "unmatched")
        method = scope.get("method", "")
        status = info["status"] or 500
        self.metrics.requests.inc(route=route_path, method=method_label(method), status=str(status))
        self.metrics.latency.observe(seconds, route=route_path)
        client = scope.get("client") or ("", 0)
        access_logger.info(
            json.dumps(
                {
                    "event": "request",
                    "request_id": request_id,
                    "method": _bounded(method, LOG_FIELD_CHARS),
                    "path": _bounded(path, LOG_PATH_CHARS),
                    "route": route_path,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                    "bytes_in": info["bytes_in"],
                    "bytes_out": info["bytes_out"],
                    "client": f"{client[0]}:{client[1]}",
                }
            )
        )
