"""The OpenAI chat completions API, for the `openai` client (and anything vLLM-compatible): `POST
/v1/chat/completions`. The model list is `GET /v1/models` (`routes.v1`), whose `data` is the OpenAI API's.

The last message is the user's; its content holds one `image_url` part (a `data:image/...;base64,` URL, or an http(s)
URL fetched by the safe fetcher) and optionally `text` parts (joined by spaces). Earlier messages are ignored. The
`model` names a loaded model, which decides what the text is:

- a model that answers questions (BLIP VQA, BLIP-2 OPT and T5): the question (BLIP-2 puts it in its prompt template);
  without text, a BLIP-2 model captions;
- a captioning model: the caption's prompt ("a picture of" -> "a picture of a dog ..."; the reply is the caption as
  `Blip.caption` returns it, prompt included).

Options: `max_tokens` (or `max_completion_tokens`) is max_new_tokens (default: the task's, as in the Python API);
`temperature` above 0, or `top_p`, samples (`temperature` default then 1, `top_p` 1, as OpenAI's; without them
decoding is greedy, as `Blip.caption`'s default); `n` choices are `n` samples when sampling, else the `n` best beams
(beam search of width `n`); `seed` makes sampling repeatable. Questions are answered greedily (sampling is refused
for them), `n` > 1 again the `n` best beams. `usage` counts the text's tokens as the model reads them (the image is
not counted) and the tokens generated over all choices, end tokens included.

`stream: true` answers server-sent `chat.completion.chunk` events while the model decodes: each choice's role, then
its text word by word as the tokens come (greedy decoding, and sampling with each of the `n` samples its own `index`),
its finish reason, the usage when `stream_options.include_usage` asks, then `data: [DONE]`. The deltas join to exactly
the non-streamed text: a word is sent once no later token can change it (`blip.tasks.streaming`), the rest when
decoding ends. Beam search (`n` > 1 without sampling) has no final token before the end: its texts are sent word by
word once finished. A streaming request runs alone on the model thread (not merged with others), under the same
admission, limits and timeout; its errors before the first event are the usual JSON ones, later ones an error event.
A client that hangs up stops its decoding at the next step.

Errors come as `{"error": {"message", "type", "param", "code"}}` (the openai client raises its own `BadRequestError`,
`AuthenticationError`, `NotFoundError`, ... with the message): a bad request is a 400, an unknown model a 404."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse

from blip.models.generation import TokenListener
from blip.serve.errors import ApiError, error_responses
from blip.serve.inputs import ImageSource, from_string_or_data_url
from blip.serve.routes.shared import AUTH, ServiceDep, shaped_router
from blip.serve.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatRequest,
    ChatResponseMessage,
    ChatUsage,
    OpenAiErrorResponse,
)
from blip.serve.service import Service
from blip.tasks.common import Answer, Caption
from blip.tasks.options import CaptionOptions, VqaOptions, is_blip2
from blip.tasks.streaming import TextDeltas, partial_text

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)

PATH = "/v1/chat/completions"
ERROR_TYPES = {401: "authentication_error", 408: "timeout", 503: "server_error"}


def error_shape(status: int, code: str, message: str, field: str | None) -> tuple[int, dict[str, Any]]:
    """The OpenAI API's error body: a bad request is a 400, an unknown model a 404 (code model_not_found)."""
    if code == "unknown_model":
        status, code = 404, "model_not_found"
    elif status == 422:
        status = 400
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": message, "type": kind, "param": field, "code": code}}


ERRORS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the completion; with stream: true, server-sent chat.completion.chunk events",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(
        OpenAiErrorResponse,
        {
            400: "invalid request, image, URL or option; the error names the field (param)",
            401: "missing or wrong token (when the server has one): the openai client's api_key",
            404: "no loaded model of that name",
            408: "the request body did not arrive in time",
            413: "body or image too large",
            503: "overloaded, timed out, or not ready; retry later",
        },
    ),
}

router = shaped_router("OpenAI", error_shape, dependencies=AUTH)


@router.post(PATH, response_model=ChatCompletion, responses=ERRORS, summary="OpenAI chat completion over one image")
async def chat_completions(body: ChatRequest, svc: ServiceDep) -> Any:
    """Caption the image (the text: the prompt) or answer the text about it, as the named model does."""
    source, text, text_field = _parts(svc, body)
    name, blip, task = _target(svc, body.model, text, text_field)
    max_new_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    if task == "caption":
        options: CaptionOptions | VqaOptions = _caption_options(body, text, text_field, max_new_tokens)
    else:
        options = _vqa_options(svc, body, blip, max_new_tokens)
    job = _Completion(svc, body, name, blip, task, options, source, text, text_field)
    if body.stream:
        return await _stream(job)
    return job.completion(await job.results(None))


@dataclass
class _Completion:
    """One checked request: its model, task, options, image and text."""

    svc: Service
    body: ChatRequest
    name: str
    blip: Blip
    task: str
    options: CaptionOptions | VqaOptions
    source: ImageSource
    text: str
    text_field: str

    async def results(self, listener: TokenListener | None) -> list[Caption] | list[Answer]:
        """The choices' results: through the micro-batcher; with a `listener` (streaming), alone, the decoding
        reporting each step to it. An option's error is named as the request names it."""
        with _renamed_errors(self.text_field):
            return await self._run(listener)

    async def _run(self, listener: TokenListener | None) -> list[Caption] | list[Answer]:
        svc, name, blip, source, n, options = self.svc, self.name, self.blip, self.source, self.body.n, self.options
        if isinstance(options, CaptionOptions):
            (captions,) = await svc.caption(name, blip, options, [source], field=source.field, listener=listener)
            return captions
        question, field = [self.text], [self.text_field]
        if n == 1:
            return await svc.answer(name, options, [source], question, [0], field, listener=listener)
        (answers,) = await svc.top_answers(name, options, n, [source], question, [0], field, listener=listener)
        return answers

    def completion(self, results: list[Caption] | list[Answer]) -> ChatCompletion:
        blip, task = self.blip, self.task
        prompt_tokens = _prompt_tokens(blip, task, self.text, self.options)
        generated = [_generated(blip, task, r.token_ids, prompt_tokens) for r in results]
        limit, end = self.options.max_new_tokens, _end_id(blip)
        choices = [
            ChatChoice(
                index=i,
                message=ChatResponseMessage(content=r.text),
                finish_reason="length" if count >= limit and r.token_ids[-1:] != [end] else "stop",
            )
            for i, (r, count) in enumerate(zip(results, generated))
        ]
        usage = ChatUsage(
            prompt_tokens=prompt_tokens, completion_tokens=sum(generated), total_tokens=prompt_tokens + sum(generated)
        )
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.name, choices=choices, usage=usage
        )


# --- the request ------------------------------------------------------------------------------------------------------


def _parts(svc: Service, body: ChatRequest) -> tuple[ImageSource, str, str]:
    """(the image, the text, the field naming the text) of the last message, the user's."""
    i = len(body.messages) - 1
    message = body.messages[i]
    field = f"messages[{i}].content"
    if message.role != "user":
        raise svc.invalid(
            f"messages[{i}].role", f"the last message must be the user's (with the image), got {message.role!r}"
        )
    if not isinstance(message.content, list):
        raise svc.invalid(field, "give a list of parts: an image_url part (the image) and optionally a text part")
    images = [j for j, part in enumerate(message.content) if part.type == "image_url"]
    if len(images) != 1:
        raise svc.invalid(field, f"expected one image_url part, got {len(images)}")
    j = images[0]
    image = message.content[j].image_url
    if image is None:
        raise svc.invalid(
            f"{field}[{j}].image_url", "missing: give {'url': 'data:image/...;base64,...' or 'https://...'}"
        )
    texts = []
    for k, part in enumerate(message.content):
        if part.type == "text":
            if part.text is None:
                raise svc.invalid(f"{field}[{k}].text", "missing")
            texts.append((k, part.text))
    svc.check_texts([(f"{field}[{k}].text", t) for k, t in texts])
    text_field = f"{field}[{texts[0][0]}].text" if len(texts) == 1 else field
    text = " ".join(t for _, t in texts).strip()
    return from_string_or_data_url(image.url, f"{field}[{j}].image_url.url"), text, text_field


def _target(svc: Service, model: str, text: str, text_field: str) -> tuple[str, Blip, str]:
    """(name, model, task): a model that answers questions answers the text; without text, or a captioning model,
    captions (the text as the prompt)."""
    svc.check_ready()
    blip = svc.models.get(model)
    if blip is None:
        svc.resolve(model, "caption")  # raises: no model named so (404)
    assert blip is not None
    tasks = blip.tasks
    task = "vqa" if "vqa" in tasks and (text or "caption" not in tasks) else "caption"
    if task == "vqa" and not text:
        raise svc.invalid(text_field, f"model {model!r} answers questions: add a text part with the question")
    name, blip = svc.resolve(model, task)
    return name, blip, task


OPTION_NAMES = {"max_new_tokens": "max_tokens", "num_captions": "n", "num_beams": "n"}  # options -> request fields


def _renamed(field: str, message: str, text_field: str) -> tuple[str, str]:
    """An option's error as the request names it: (field, message)."""
    name = text_field if field == "prompt" else OPTION_NAMES.get(field, field)
    reason = message.removeprefix(f"{field}: ")
    return name, f"{name}: {'as the prompt: ' if field == 'prompt' else ''}{reason}"


@contextlib.contextmanager
def _renamed_errors(text_field: str) -> Iterator[None]:
    """An error of an option (the server's caps, the model's limits) raised inside, named as the request names it."""
    try:
        yield
    except ApiError as e:
        if e.field not in (*OPTION_NAMES, "prompt"):
            raise
        field, message = _renamed(e.field, e.message, text_field)
        raise ApiError(e.status, e.code, message, field=field, headers=e.headers) from e


def _caption_options(body: ChatRequest, text: str, text_field: str, max_new_tokens: int | None) -> CaptionOptions:
    sampling = body.temperature > 0 if body.temperature is not None else body.top_p is not None
    values: dict[str, Any] = {"prompt": text or None}
    if max_new_tokens is not None:
        values["max_new_tokens"] = max_new_tokens
    if sampling:
        temperature = body.temperature if body.temperature is not None else 1.0
        top_p = body.top_p if body.top_p is not None else 1.0
        values.update({"do_sample": True, "temperature": temperature, "top_p": top_p, "seed": body.seed})
        values["num_captions"] = body.n
    elif body.n > 1:
        values.update(num_beams=body.n, num_captions=body.n)  # the n best beams
    with _renamed_errors(text_field):
        return Service.options(lambda: CaptionOptions(**values))


def _vqa_options(svc: Service, body: ChatRequest, blip: Blip, max_new_tokens: int | None) -> VqaOptions:
    if (body.temperature or 0) > 0 or (body.temperature is None and body.top_p is not None):
        field = "temperature" if body.temperature is not None else "top_p"
        raise svc.invalid(field, "questions are answered greedily: leave out temperature and top_p (or temperature 0)")
    values: dict[str, Any] = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    if body.n > 1:
        values["num_beams"] = body.n  # the n best beams
    with _renamed_errors(""):  # the server's caps and the model's limits never name a prompt here
        return svc.vqa_options(svc.options(lambda: VqaOptions(**values)), blip)


# --- usage ------------------------------------------------------------------------------------------------------------


def _prompt_tokens(blip: Blip, task: str, text: str, options: CaptionOptions | VqaOptions) -> int:
    """The text's tokens as the model reads them: BLIP's [DEC] + prompt, or its question ([CLS] .. [SEP]); BLIP-2's
    prompt (the question in its template) with the language model's own specials."""
    if is_blip2(blip):
        from blip.tasks.blip2 import prompt_ids, question_prompt

        template = options.prompt_template if isinstance(options, VqaOptions) else None
        return len(prompt_ids(blip, question_prompt(template, text, blip) if task == "vqa" else text or None))
    if task == "vqa":
        return len(blip.tokenizer.encode(text))
    from blip.tasks.caption import prompt_prefix

    return len(prompt_prefix(blip, text or None))


def _end_id(blip: Blip) -> int | None:
    """The token that ends a generated text (what the tasks give `generate` as its end)."""
    return blip.config.text.eos_token_id if is_blip2(blip) else blip.config.text.sep_token_id


def _generated(blip: Blip, task: str, token_ids: list[int], prompt_tokens: int) -> int:
    """Tokens the model generated, from a result's `token_ids` (what each family puts there: `blip.tasks`)."""
    if is_blip2(blip):
        if blip.config.kind == "opt":  # caption: BLIP + prompt + generated; answer: generated alone
            return len(token_ids) - (prompt_tokens if task == "caption" else 0)
        return len(token_ids) - 1  # T5: decoder start + generated
    return len(token_ids) - (prompt_tokens if task == "caption" else 1)  # [DEC] (+ prompt) + generated


# --- streaming --------------------------------------------------------------------------------------------------------


class _Gone(Exception):
    """The streaming client went away: raised by its token listener, it stops the decoding."""


async def _stream(job: _Completion) -> StreamingResponse:
    """Run the job with a token listener and answer its events once the first decoding step is done (or the job is,
    for beam search); an error before that is the usual JSON error."""
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue[tuple[list[int], list[int]] | None] = asyncio.Queue()  # None: the job is done
    gone = threading.Event()

    def listener(step: int, rows: list[int], tokens: list[int]) -> None:  # on the inference thread
        if gone.is_set():
            raise _Gone("the client went away")
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening
            loop.call_soon_threadsafe(steps.put_nowait, (rows, tokens))

    def done(task: asyncio.Future) -> None:
        if not task.cancelled():
            task.exception()  # retrieved here: a stream that ended early reads no result
        steps.put_nowait(None)

    work = asyncio.ensure_future(job.results(listener))
    work.add_done_callback(done)
    try:
        first = await steps.get()
    except BaseException:
        gone.set()
        work.cancel()
        raise
    if first is None:
        work.result()  # raises the job's error, if any
    include_usage = job.body.stream_options is not None and job.body.stream_options.include_usage
    events = _events(job, first, steps, work, gone, include_usage)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def pieces(text: str) -> list[str]:
    """`text` cut before each word that follows a space: the pieces join back to exactly `text`."""
    return [p for p in re.split(r"(?<=\s)(?=\S)", text) if p]


async def _events(
    job: _Completion,
    first: tuple[list[int], list[int]] | None,
    steps: asyncio.Queue[tuple[list[int], list[int]] | None],
    work: asyncio.Future,
    gone: threading.Event,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """`chat.completion.chunk` events: each choice's role; its text as it is decoded (the settled words, see
    `blip.tasks.streaming`); the rest of each finished text and its finish reason; the usage when asked for; [DONE].
    The decoding's rows are the choices (one source: row i is choice i)."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time())}
    head["model"] = job.name

    def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        chunk = {**head, "choices": choices}
        if include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n".encode()

    def delta(i: int, content: str) -> bytes:
        return event([{"index": i, "delta": {"content": content}, "finish_reason": None}])

    n = job.body.n
    text_of = partial_text(job.blip, job.task, job.text or None)
    generated: list[list[int]] = [[] for _ in range(n)]
    deltas = [TextDeltas() for _ in range(n)]
    try:
        for i in range(n):
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        item = first
        while item is not None:
            items = [item]
            while not steps.empty():  # what arrived meanwhile: decode once
                items.append(steps.get_nowait())
            changed = set()
            for step in items:
                if step is not None:
                    for row, token in zip(*step):
                        generated[row].append(token)
                        changed.add(row)
            for i in sorted(changed):
                if text := deltas[i].update(text_of(generated[i])):
                    yield delta(i, text)
            item = None if items[-1] is None else await steps.get()
        try:
            completion = job.completion(work.result())
        except Exception as e:  # after the first event: the error as an event (the openai client raises APIError)
            if isinstance(e, ApiError):
                _, body = error_shape(e.status, e.code, e.message, e.field)
            else:
                _logger.error("chat completion stream failed", exc_info=e)
                _, body = error_shape(500, "internal_error", "internal error; see the server log", None)
            yield f"data: {json.dumps(body)}\n\n".encode()
            return
        for choice in completion.choices:
            i = choice.index
            for piece in pieces(deltas[i].finish(choice.message.content)):
                yield delta(i, piece)
            yield event([{"index": i, "delta": {}, "finish_reason": choice.finish_reason}])
        if include_usage:
            yield event([], completion.usage.model_dump())
        yield b"data: [DONE]\n\n"
    finally:
        gone.set()  # a client gone mid-stream: the decoding stops at its next step
        if not work.done():
            work.cancel()
