"""The Hugging Face Inference API, for `huggingface_hub.InferenceClient`: `POST /hf` (the first model able to do the
task) and `POST /hf/{model}` (a loaded model by name). huggingface_hub posts every task of a client made with
`model=<URL>` or `base_url=<URL>` to that URL itself, so one route takes both tasks and tells them apart by the body:

- image-to-text: the raw image file as the body, or `{"inputs": <image>, "parameters": {"max_new_tokens",
  "generation_parameters": {...}}}` -> `[{"generated_text": ...}]`
- visual question answering: `{"inputs": {"image", "question"}, "parameters": {"top_k"}}`, or the flat form
  huggingface_hub 2.4 sends, `{"inputs": <image>, "image": <image>, "question": ..., "parameters": {}}`
  -> `[{"answer": ..., "score": ...}]`

An image is base64, an http(s) URL (through the safe fetcher) or a `data:image/...;base64,` URL. `top_k` asks for at
most that many answers: without it (or 1) the answer is generated greedily, as `Blip.answer` does by default; with
`top_k` = k > 1, by beam search of width k, the k best beams, best first. `score` is exp of the answer's generation
score: its sequence log-probability (greedy: the probability of the answer), or its beam score (the log-probability
over the length, as beam search ranks them). Errors come as the Inference
API words them, `{"error": <message>, "error_type": <code>}` (huggingface_hub raises `HfHubHTTPError` with the
message), a bad input with 400 and an unknown model with 404."""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any

from fastapi import Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from blip.serve.errors import ApiError, error_responses
from blip.serve.inputs import ImageSource, from_string_or_data_url
from blip.serve.middleware import is_json
from blip.serve.routes.shared import AUTH, ServiceDep, shaped_router
from blip.serve.schemas import (
    HfAnswer,
    HfCaptionParameters,
    HfErrorResponse,
    HfGeneratedText,
    HfImageToTextRequest,
    HfVqaFlatRequest,
    HfVqaRequest,
)
from blip.serve.service import Service
from blip.tasks.options import CaptionOptions, OptionError, VqaOptions

PREFIX = "/hf"


def error_shape(status: int, code: str, message: str, field: str | None) -> tuple[int, dict[str, Any]]:
    """The Inference API's error body; a bad input is a 400 there (huggingface_hub: `BadRequestError`), an unknown
    model a 404."""
    if code == "unknown_model":
        status = 404
    elif status == 422:
        status = 400
    return status, {"error": message, "error_type": code}


ERRORS = error_responses(
    HfErrorResponse,
    {
        400: "invalid body, image, URL or parameter; the error names it",
        401: "missing or wrong token (when the server has one)",
        404: "no loaded model of that name",
        408: "the request body did not arrive in time",
        413: "body or image too large",
        503: "overloaded, timed out, or not ready; retry later",
    },
)

router = shaped_router("Hugging Face Inference", error_shape, dependencies=AUTH)


def _inline(schema: dict[str, Any], examples: bool) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` put in place (the OpenAPI document has no components for it)."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]]))
            return {k: resolve(v) for k, v in node.items() if k != "$defs" and (examples or k != "examples")}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def _request_body(examples: bool) -> dict[str, Any]:
    forms = (HfImageToTextRequest, HfVqaRequest, HfVqaFlatRequest)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"anyOf": [_inline(f.model_json_schema(), examples) for f in forms]}},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary", "description": "the image file (any image/* too)"}
                },
            },
        }
    }


ModelPath = Annotated[str, Path(description="a loaded model's name (GET /v1/models lists them)")]
RESPONSES = list[HfGeneratedText] | list[HfAnswer]


@router.post(
    PREFIX,
    response_model=RESPONSES,
    responses=ERRORS,
    summary="Hugging Face Inference: image-to-text (image body) or visual question answering (JSON with a question)",
    openapi_extra=_request_body(examples=True),
)
async def infer(request: Request, svc: ServiceDep) -> Any:
    """The first loaded model able to do the task: caption the image, or answer the question."""
    return await _infer(request, svc, None)


@router.post(
    f"{PREFIX}/{{model}}",
    response_model=RESPONSES,
    responses=ERRORS,
    summary="Hugging Face Inference with the model named in the path",
    openapi_extra=_request_body(examples=False),
)
async def infer_with(model: ModelPath, request: Request, svc: ServiceDep) -> Any:
    """`POST /hf` with this model: `InferenceClient(model="http://host:port/hf/<model>")`."""
    return await _infer(request, svc, model)


async def _infer(request: Request, svc: Service, model: str | None) -> list[HfGeneratedText] | list[HfAnswer]:
    body = await _json_body(request)
    if body is None:  # the image file itself
        return await _caption(svc, model, ImageSource("inputs", "bytes", await request.body()), None)
    if isinstance(body.get("inputs"), dict):
        nested = _validated(HfVqaRequest, body)
        source = from_string_or_data_url(nested.inputs.image, "inputs.image")
        top_k = nested.parameters.top_k if nested.parameters is not None else None
        return await _answer(svc, model, source, nested.inputs.question, "inputs.question", top_k)
    if "question" in body:
        flat = _validated(HfVqaFlatRequest, body)
        image, field = (flat.image, "image") if flat.image is not None else (flat.inputs, "inputs")
        if not image:
            raise svc.invalid("image", "give the image (base64 or a URL) in 'image' or 'inputs'")
        top_k = flat.parameters.top_k if flat.parameters is not None else None
        return await _answer(svc, model, from_string_or_data_url(image, field), flat.question, "question", top_k)
    caption = _validated(HfImageToTextRequest, body)
    return await _caption(svc, model, from_string_or_data_url(caption.inputs, "inputs"), caption.parameters)


async def _json_body(request: Request) -> dict[str, Any] | None:
    """The JSON object of a JSON body (bounded parsing, `BoundedJsonRequest`); None when the body is a file. A body
    with no content type is JSON when it starts with `{`."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        json_body = (await request.body()).lstrip()[:1] == b"{"
    else:
        json_body = is_json(content_type)
    if not json_body:
        return None
    try:
        data = await request.json()
    except ValueError as e:  # json.JSONDecodeError, or not UTF-8
        raise ApiError(400, "malformed_json", f"body: not valid JSON ({e})", field="body") from e
    if not isinstance(data, dict):
        raise Service.invalid("body", f"expected a JSON object, got {type(data).__name__}")
    return data


def _validated(schema: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def _caption_options(svc: Service, params: HfCaptionParameters | None) -> CaptionOptions:
    """The generation parameters as `CaptionOptions`; a bad one is refused, named where the request has it."""
    values: dict[str, Any] = {}
    if params is not None and params.generation_parameters is not None:
        values = params.generation_parameters.model_dump(exclude_none=True)
        values.pop("use_cache", None)
    if params is not None and params.max_new_tokens is not None:
        values["max_new_tokens"] = params.max_new_tokens
    try:
        return CaptionOptions(**values)
    except OptionError as e:
        top = params is not None and params.max_new_tokens is not None and e.field == "max_new_tokens"
        raise svc.invalid(f"parameters.{'' if top else 'generation_parameters.'}{e.field}", e.reason) from e


async def _caption(
    svc: Service, model: str | None, source: ImageSource, params: HfCaptionParameters | None
) -> list[HfGeneratedText]:
    name, blip = svc.resolve(model, "caption")
    captions = await svc.caption(name, blip, _caption_options(svc, params), [source], field="inputs")
    return [HfGeneratedText(generated_text=captions[0][0].text)]


def probability(log_probability: float) -> float:
    """exp(log-probability) within [0, 1] (0 when not finite)."""
    return min(math.exp(log_probability), 1.0) if math.isfinite(log_probability) else 0.0


async def _answer(
    svc: Service, model: str | None, source: ImageSource, question: str, field: str, top_k: int | None
) -> list[HfAnswer]:
    """The answer (greedy, as `Blip.answer`'s default), or the `top_k` best beams of beam search of width top_k."""
    name, blip = svc.resolve(model, "vqa")
    svc.check_texts([(field, question)])
    if top_k is None or top_k == 1:
        options = svc.vqa_options(VqaOptions(), blip)
        answers = await svc.answer(name, options, [source], [question], [0], [field])
    else:
        try:
            options = svc.vqa_options(svc.options(lambda: VqaOptions(num_beams=top_k)), blip)
        except ApiError as e:  # over the server's beam limit
            raise svc.invalid("parameters.top_k", e.message.removeprefix(f"{e.field}: ")) from e
        (answers,) = await svc.top_answers(name, options, top_k, [source], [question], [0], [field])
    return [HfAnswer(answer=a.text, score=probability(a.score)) for a in answers]
