"""What the route modules share: the one `Service` (a dependency reading `app.state.service`), the token check,
the parameters several routes take, uploads, answering groups of questions (the model card's and /v1/vqa), and the
routers of APIs that word their errors their own way (`shaped_router`)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from blip.serve import errors
from blip.serve.errors import ApiError, ErrorShape
from blip.serve.inputs import ImageSource
from blip.serve.middleware import BodyTimeout, BodyTooLarge, BoundedJsonRoute
from blip.serve.service import Service
from blip.tasks.common import Answer
from blip.tasks.options import VqaOptions


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]
bearer = HTTPBearer(auto_error=False, description="the server's token, when started with one")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
ModelQuery = Annotated[str | None, Query(description="a loaded model's name (default: the first able to)")]
Uploads = Annotated[list[UploadFile], File(description="image files (PNG, JPEG, GIF, WebP, BMP, TIFF)")]


async def require_auth(svc: ServiceDep, credentials: Credentials) -> None:
    """The bearer token, when the server has one (the middleware has checked it before the body was read)."""
    svc.authorize(credentials)


AUTH = [Depends(require_auth)]


def api_router(tag: str, **kwargs: Any) -> APIRouter:
    """A router for one group of routes (`tag` in the API docs), parsing JSON bodies under the server's caps."""
    return APIRouter(tags=[tag], route_class=BoundedJsonRoute, **kwargs)


def shaped_router(tag: str, shape: ErrorShape, **kwargs: Any) -> APIRouter:
    """`api_router` for an API with its own error shape: a route's failures (ApiError, a body that does not
    validate, an HTTP error) are answered as `shape` words them; the middleware's own answers (token, body size,
    overload) get the shape by path (`blip.serve.routes.error_shape`)."""

    class ShapedRoute(BoundedJsonRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            handler = super().get_route_handler()

            async def shaped_handler(request: Request) -> Response:
                try:
                    return await handler(request)
                except (BodyTooLarge, BodyTimeout):
                    raise  # the middleware answers these (and counts them)
                except ApiError as e:
                    return errors.reshaped(errors.api_error(e), shape)
                except RequestValidationError as e:
                    return errors.reshaped(errors.validation_error(e), shape)
                except HTTPException as e:
                    return errors.reshaped(errors.http_error(e), shape)

            return shaped_handler

    return APIRouter(tags=[tag], route_class=ShapedRoute, **kwargs)


def finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


async def read_uploads(svc: Service, files: list[UploadFile]) -> list[ImageSource]:
    """Uploaded image files (at most the server's images per request, each read up to one byte past its cap)."""
    svc.check_count(len(files), svc.settings.max_images, "images", "images")
    limit = svc.settings.fetch_max_bytes
    return [ImageSource(f"images[{i}]", "bytes", await upload.read(limit + 1)) for i, upload in enumerate(files)]


async def answer_groups(
    svc: Service,
    model: str | None,
    sources: list[ImageSource],
    groups: list[list[str]],
    options: Callable[[], VqaOptions],
    fields: tuple[str, str, str] = ("model", "images", "questions"),
) -> tuple[str, list[list[tuple[str, Answer]]]]:
    """(model name, per image its (question, answer) pairs) for `groups[i]`, the questions about `sources[i]`; every
    image is encoded once. `fields`: the request's names for the model, the images and the questions."""
    model_field, images_field, questions_field = fields
    name, blip = svc.resolve(model, "vqa", field=model_field)
    questions, image_of = svc.check_questions(len(sources), groups, images_field, questions_field)
    fields = [f"{questions_field}[{i}][{j}]" for i, group in enumerate(groups) for j in range(len(group))]
    vqa_options = svc.vqa_options(svc.options(options), blip)
    answers = await svc.answer(name, vqa_options, sources, questions, image_of, fields)
    per_image: list[list[tuple[str, Answer]]] = [[] for _ in sources]
    for image, question, answer in zip(image_of, questions, answers):
        per_image[image].append((question, answer))
    return name, per_image
