"""The one error shape every failure answers with, `{"error": {"code", "message", "field"}}`: `ApiError` (raised by
the routes, the service and the image loader), the body itself (also written by the ASGI middleware, before any route
runs), how FastAPI's own failures (a body that does not validate, an HTTP error) map onto it, and the error responses
the OpenAPI document lists for the routes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from blip.serve.schemas import ErrorResponse


def error_responses(model: type, descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's error responses for the OpenAPI document: each status with `model` as its body and its description;
    a 503 also lists its Retry-After header."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status, description in descriptions.items():
        responses[status] = {"model": model, "description": description}
        if status == 503:
            responses[status]["headers"] = {
                "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
            }
    return responses


ERRORS = error_responses(
    ErrorResponse,
    {
        400: "malformed request (e.g. body is not JSON)",
        401: "missing or wrong token (when the server has one)",
        408: "the request body did not arrive in time",
        413: "body or image too large",
        422: "invalid field, image or URL; the error names the field",
        503: "overloaded, timed out, or not ready; retry later",
    },
)
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}
STATUS_CODES.update({408: "body_timeout", 413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_request"})


# How an API outside ours words its errors: (status, code, message, field) -> (status, body). The routes of the
# Hugging Face and OpenAI schemas answer in their clients' shapes, so those clients raise their own errors with our
# message; the standard shape is `standard_shape`.
ErrorShape = Callable[[int, str, str, str | None], tuple[int, dict[str, Any]]]


class ApiError(Exception):
    """A failure answered as `{"error": {"code", "message", "field"}}` with `status`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_content(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def standard_shape(status: int, code: str, message: str, field: str | None) -> tuple[int, dict[str, Any]]:
    return status, error_content(code, message, field)


def reshaped(response: JSONResponse, shape: ErrorShape) -> JSONResponse:
    """A response in the standard error shape, answered in `shape` instead (same headers but the body's own)."""
    detail = json.loads(bytes(response.body))["error"]
    status, content = shape(response.status_code, detail["code"], detail["message"], detail["field"])
    skip = ("content-length", "content-type")
    headers = {k: v for k, v in response.headers.items() if k.lower() not in skip}
    return JSONResponse(content, status_code=status, headers=headers)


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    """The error body as bytes, for the layers below FastAPI (the ASGI middleware, the connection guard)."""
    return json.dumps(error_content(code, message, field)).encode()


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_content(code, message, field), status_code=status, headers=headers)


def api_error(exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """A body that is not JSON: 400 malformed_json; a field that does not validate: 422 naming the first one."""
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    field = _field_path(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        message = f"body: not valid JSON ({reason})" if reason else "body: not valid JSON"
        return error_response(400, "malformed_json", message, "body")
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    message = f"{field}: {msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(422, "invalid_request", message, field)


def http_error(exc: HTTPException) -> JSONResponse:
    """An HTTP error raised by FastAPI, Starlette or the middleware's body checks, with the field it concerns."""
    code = STATUS_CODES.get(exc.status_code, "error")
    field = "body" if exc.status_code in (400, 408, 413) else "Authorization" if exc.status_code == 401 else None
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 400 and field:
        message = message if message.startswith("body") else f"body: {message}"
    return error_response(exc.status_code, code, message, field, dict(exc.headers or {}))
