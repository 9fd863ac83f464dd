"""The `openai` Python client against a live `blip serve` (the tiny caption and VQA models): chat completions give
what the Python API gives with the same options, n and seed behave, the model list reads, and bad input, a too-long
prompt, a wrong token, an unknown model, a private URL and too many pixels come back as the client's own exceptions
carrying our message. Streaming sends words while the model decodes (greedy, sampled choices each with its index;
beams once finished), they join to the non-streamed text (BLIP, BLIP-2 OPT and T5), refusals before the first event
are the usual errors, a timeout after it an error event, and a client that hangs up stops the decoding."""

from __future__ import annotations

import time

import httpx
import pytest
from PIL import Image
from serve_helpers import LiveServer, b64, png_bytes

from blip.serve import ServeSettings, create_app

openai = pytest.importorskip("openai")

TOKEN = "openai-test-key"
QUESTION = "what color is the circle ?"
PROMPT = "a picture of"


@pytest.fixture(scope="module")
def client(guarded) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=TOKEN, max_retries=0, timeout=30)


def data_url(image: Image.Image) -> str:
    return f"data:image/png;base64,{b64(png_bytes(image))}"


def user(image_url: str, text: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": image_url}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def chat(client: openai.OpenAI, model: str, image_url: str, text: str | None = None, **options):
    return client.chat.completions.create(model=model, messages=user(image_url, text), **options)


def test_the_model_list(client, tiny_models):
    assert [m.id for m in client.models.list()] == list(tiny_models)


def test_captions_equal_the_python_api(client, tiny_models, images):
    m = tiny_models["captioner"]
    done = chat(client, "captioner", data_url(images[0]))
    assert done.choices[0].message.content == m.caption(images[0])[0].text
    assert done.object == "chat.completion" and done.model == "captioner"
    assert done.usage.prompt_tokens == 1  # [DEC]
    assert done.usage.completion_tokens == len(m.caption(images[0])[0].token_ids) - 1
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    prompted = chat(client, "captioner", data_url(images[1]), PROMPT, max_tokens=8)
    expected = m.caption(images[1], prompt=PROMPT, max_new_tokens=8)[0]
    assert prompted.choices[0].message.content == expected.text
    assert prompted.usage.prompt_tokens == 4  # [DEC] a picture of
    assert prompted.usage.completion_tokens == len(expected.token_ids) - 4
    assert prompted.choices[0].finish_reason == ("length" if len(expected.token_ids) - 4 == 8 else "stop")


def test_answers_equal_the_python_api(client, tiny_models, images):
    done = chat(client, "vqa", data_url(images[2]), QUESTION, max_tokens=5)
    expected = tiny_models["vqa"].answer(images[2], QUESTION, max_new_tokens=5)[0]
    assert done.choices[0].message.content == expected.text
    assert done.usage.completion_tokens == len(expected.token_ids) - 1  # [DEC] + answer


def test_n_answers_are_the_best_beams(client, tiny_models, images):
    m = tiny_models["vqa"]
    done = chat(client, "vqa", data_url(images[0]), QUESTION, n=3)
    texts = [c.message.content for c in done.choices]
    assert len(texts) == 3 and texts[0] == m.answer(images[0], QUESTION, num_beams=3)[0].text
    assert done.usage.completion_tokens >= 3


def streamed(client: openai.OpenAI, model: str, image_url: str, text: str | None = None, **options):
    """A streamed completion: per choice index its text joined from the deltas, its finish reason and how many
    chunks brought text; and the usage chunk (the last)."""
    stream = chat(client, model, image_url, text, stream=True, stream_options={"include_usage": True}, **options)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks) and chunks[-1].choices == []
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    pieces: dict[int, int] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        i = choice.index
        if i not in texts:
            assert choice.delta.role == "assistant"  # each choice starts with its role
        texts[i] = texts.get(i, "") + (choice.delta.content or "")
        pieces[i] = pieces.get(i, 0) + bool(choice.delta.content)
        if choice.finish_reason is not None:
            assert i not in reasons
            reasons[i] = choice.finish_reason
    return texts, reasons, pieces, chunks[-1].usage


def assert_streams_as_it_completes(client, model, image_url, text=None, several=True, **options) -> None:
    """The streamed choices (text, finish reason, usage) equal the non-streamed ones; with `several`, each choice's
    text came in more than one piece."""
    whole = chat(client, model, image_url, text, **options)
    texts, reasons, pieces, usage = streamed(client, model, image_url, text, **options)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage == whole.usage
    if several:
        assert all(count > 1 for count in pieces.values()), pieces


STREAMED = {
    "greedy": dict(max_tokens=20),
    "sampled_n2": dict(temperature=1.0, n=2, seed=5, max_tokens=20),
    "nucleus_n2": dict(top_p=0.8, n=2, seed=9, max_tokens=20),
}


@pytest.mark.parametrize("prompt", [None, PROMPT])
@pytest.mark.parametrize("setting", list(STREAMED))
def test_streamed_captions_equal_the_completion(client, images, setting, prompt):
    assert_streams_as_it_completes(client, "captioner", data_url(images[3]), prompt, **STREAMED[setting])


def test_streamed_answers_and_beams_equal_the_completion(client, images):
    assert_streams_as_it_completes(client, "vqa", data_url(images[0]), "is there a cat?", max_tokens=8)
    # beam search (n > 1 without sampling) streams the finished texts
    assert_streams_as_it_completes(client, "captioner", data_url(images[0]), n=2, several=False)
    assert_streams_as_it_completes(client, "vqa", data_url(images[0]), QUESTION, n=2, several=False)


@pytest.fixture
def slow_steps(monkeypatch):
    """Every decoding step of BLIP's text decoder (in the live server, in this process) takes 40 ms more; the list
    counts them."""
    from blip.models.generation import TextDecoderStepper

    steps: list[float] = []
    real = TextDecoderStepper.step

    def step(self, tokens):
        steps.append(time.monotonic())
        time.sleep(0.04)
        return real(self, tokens)

    monkeypatch.setattr(TextDecoderStepper, "step", step)
    return steps


def test_tokens_arrive_while_the_model_decodes(client, images, slow_steps):
    stream = chat(client, "captioner", data_url(images[3]), stream=True, max_tokens=20)
    arrivals = [time.monotonic() for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(slow_steps) == 19 and len(arrivals) > 10  # 20 tokens: the first from the prefix, then 19 steps
    # (the server runs in this process: one clock) the first words came before the middle step began, and most
    # words before the last one did
    assert arrivals[0] < slow_steps[9]
    assert sum(t < slow_steps[-1] for t in arrivals) > 10


def test_a_client_gone_mid_stream_stops_the_decoding(guarded, client, images, slow_steps):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "captioner", "messages": user(data_url(images[3])), "stream": True, "max_tokens": 40}
    with httpx.stream("POST", f"{guarded.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first words: hang up
    service = guarded.app.state.service
    deadline = time.monotonic() + 10
    while service.batcher.admitted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert service.batcher.admitted == 0  # the request's slot is free
    stopped = len(slow_steps)
    time.sleep(0.2)
    assert len(slow_steps) == stopped < 39  # the decoding stopped early, and stays stopped
    assert_streams_as_it_completes(client, "captioner", data_url(images[1]), max_tokens=6, several=False)


def test_n_and_seed(client, tiny_models, images):
    m = tiny_models["captioner"]
    sampled = dict(temperature=1.0, n=3, seed=7)
    first = chat(client, "captioner", data_url(images[0]), **sampled)
    again = chat(client, "captioner", data_url(images[0]), **sampled)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # the same seed, the same choices
    expected = m.caption(images[0], do_sample=True, temperature=1.0, top_p=1.0, num_captions=3, seed=7)[0]
    assert texts == [c.text for c in expected]
    other = chat(client, "captioner", data_url(images[0]), temperature=1.0, n=3, seed=8)
    assert [c.message.content for c in other.choices] != texts or len(set(texts)) == 1
    beams = chat(client, "captioner", data_url(images[0]), n=2)  # no sampling: the 2 best beams
    expected = m.caption(images[0], num_beams=2, num_captions=2)[0]
    assert [c.message.content for c in beams.choices] == [c.text for c in expected]


def test_errors_are_the_clients_own(client, guarded, images):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "captioner", "data:image/png;base64," + b64(b"not an image at all"))
    assert "not an image in an accepted format" in caught.value.message
    assert caught.value.param == "messages[0].content[0].image_url.url" and caught.value.code == "invalid_image"
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "captioner", data_url(images[0]), "a " * 150)
    assert "messages[0].content[1].text: 300 characters, over the limit of 200" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "captioner", data_url(images[0]), max_tokens=1000)
    assert "max_tokens: 1000 is over this server's limit of 64" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "vqa", data_url(images[0]), QUESTION, temperature=0.7)
    assert "temperature: questions are answered greedily" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "vqa", data_url(images[0]), QUESTION, n=9)
    assert "n: 9 is over this server's limit of 8" in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, "nope", data_url(images[0]))
    assert "no model named 'nope'" in caught.value.message and caught.value.code == "model_not_found"
    wrong = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as caught:
        chat(wrong, "captioner", data_url(images[0]))
    assert "missing or wrong bearer token" in caught.value.message
    assert caught.value.type == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        chat(wrong, "captioner", data_url(images[0]), stream=True)


def test_body_limit_answers_in_the_openai_shape(tiny_models, images):
    """The middleware's own refusals (here: a body over the cap, before it is read) come in OpenAI's shape too."""
    with LiveServer(create_app(tiny_models, ServeSettings(max_body_bytes=2000))) as live:
        small = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as caught:
            chat(small, "captioner", data_url(Image.new("RGB", (64, 64), "blue")) + "A" * 4000)
    assert caught.value.status_code == 413 and caught.value.code == "body_too_large"
    assert "over the limit of 2000" in caught.value.message and caught.value.type == "invalid_request_error"


def test_pixel_limit_holds(client):
    png = png_bytes(Image.new("RGB", (100, 100), "red"))  # 10000 pixels, over 64 * 64
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client, "captioner", f"data:image/png;base64,{b64(png)}")
    assert caught.value.status_code == 413 and "image_url.url" in caught.value.message


def test_private_urls_are_refused(server, image_server):
    """The safe fetcher refuses a loopback image URL; nothing is fetched."""
    before = list(server.recorder.urls)
    plain = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as caught:
        chat(plain, "captioner", f"{image_server.url}/image.png")
    assert caught.value.code == "url_refused" and "127.0.0.1" in caught.value.message
    assert server.recorder.urls == before


def test_huggingface_chat_completion_reaches_the_same_route(guarded, tiny_models, images):
    """InferenceClient(base_url=server).chat_completion posts to /v1/chat/completions too, streaming included."""
    hf = pytest.importorskip("huggingface_hub")
    client = hf.InferenceClient(base_url=guarded.url, api_key=TOKEN, timeout=30)
    done = client.chat_completion(messages=user(data_url(images[1]), QUESTION), model="vqa")
    assert done.choices[0].message.content == tiny_models["vqa"].answer(images[1], QUESTION)[0].text
    whole = client.chat_completion(messages=user(data_url(images[3])), model="captioner", max_tokens=12)
    chunks = list(
        client.chat_completion(messages=user(data_url(images[3])), model="captioner", max_tokens=12, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1


def test_raw_http_shapes(guarded, images):
    """The body the clients parse, as it goes over the wire (SSE ends with [DONE])."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "captioner", "messages": user(data_url(images[0])), "stream": True}
    with httpx.stream("POST", f"{guarded.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    r = httpx.post(f"{guarded.url}/v1/chat/completions", json={"model": "captioner"}, headers=headers, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "messages: Field required",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "invalid_request",
    }


def test_blip2_puts_the_question_in_its_template(blip2_server, blip2_models, images):
    """A BLIP-2 model answers the text in its prompt template and captions without one; n > 1: the best beams."""
    client = openai.OpenAI(base_url=f"{blip2_server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    for name in ("opt", "t5"):
        m = blip2_models[name]
        done = chat(client, name, data_url(images[0]), QUESTION, max_tokens=6)
        expected = m.answer(images[0], QUESTION, max_new_tokens=6)[0]
        assert done.choices[0].message.content == expected.text
        generated = len(expected.token_ids) - (0 if name == "opt" else 1)  # T5: the decoder start is not generated
        assert done.usage.completion_tokens == generated
        caption = chat(client, name, data_url(images[1]))
        assert caption.choices[0].message.content == m.caption(images[1])[0].text
    beams = chat(client, "opt", data_url(images[2]), QUESTION, n=2)
    assert beams.choices[0].message.content == blip2_models["opt"].answer(images[2], QUESTION, num_beams=2)[0].text
    assert len(beams.choices) == 2


def test_streaming_requests_get_the_same_refusals(client, tiny_models, images, slow_steps):
    """Errors found before the first event are the usual ones: a bad image, too many pixels, a too-long prompt, an
    option over the server's cap; and with every admission slot taken (here by a stream), a 503."""
    with pytest.raises(openai.BadRequestError, match="not an image in an accepted format"):
        chat(client, "captioner", "data:image/png;base64," + b64(b"not an image at all"), stream=True)
    with pytest.raises(openai.APIStatusError, match="image_url.url") as caught:
        chat(client, "captioner", data_url(Image.new("RGB", (100, 100), "red")), stream=True)
    assert caught.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="300 characters, over the limit of 200"):
        chat(client, "captioner", data_url(images[0]), "a " * 150, stream=True)
    with pytest.raises(openai.BadRequestError, match="max_tokens: 1000 is over this server's limit of 64"):
        chat(client, "captioner", data_url(images[0]), max_tokens=1000, stream=True)
    with LiveServer(create_app(tiny_models, ServeSettings(queue_size=1))) as live:
        one = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=30)
        first = chat(one, "captioner", data_url(images[3]), stream=True, max_tokens=20)
        next(iter(first))  # the stream holds the one slot while it decodes
        with pytest.raises(openai.APIStatusError, match="the server is busy") as caught:
            chat(one, "captioner", data_url(images[3]), stream=True)
        assert caught.value.status_code == 503
        first.close()


def test_a_timeout_mid_stream_ends_it_with_the_error(tiny_models, images, slow_steps):
    """Past the request timeout (it bounds the whole request, as without streaming) the stream ends with an error
    event, which the client raises with our message; the decoding stops and the slot is free."""
    with LiveServer(create_app(tiny_models, ServeSettings(timeout_s=0.4))) as live:
        short = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=30)
        stream = chat(short, "captioner", data_url(images[3]), stream=True, max_tokens=40)
        with pytest.raises(openai.APIError, match="the request took longer than 0.4 s") as caught:
            for _ in stream:
                pass
        assert caught.value.code == "timeout"
        time.sleep(0.2)
        assert len(slow_steps) < 39  # stopped at the step after the error
        assert live.app.state.service.batcher.admitted == 0


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_blip2_streams_as_it_completes(blip2_server, images, name):
    """BLIP-2's text leaves out the query placeholders (OPT) and the prompt (answers), or follows T5's decoder
    start, and its random tiny models write broken UTF-8 and few spaces: streamed, it is still the completion's:
    answers, captions, sampled captions."""
    client = openai.OpenAI(base_url=f"{blip2_server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    url = data_url(images[1])
    assert_streams_as_it_completes(client, name, url, QUESTION, max_tokens=12, several=False)
    assert_streams_as_it_completes(client, name, url, max_tokens=12, several=False)
    sampled = dict(temperature=1.0, n=2, seed=3, max_tokens=12)
    assert_streams_as_it_completes(client, name, data_url(images[0]), several=False, **sampled)  # a caption


def test_an_end_token_at_the_limit_is_a_stop(client, tiny_models, images):
    """finish_reason "length" means cut off: an answer whose end token is the max_tokens-th one stopped by itself."""
    m = tiny_models["vqa"]
    natural = m.answer(images[0], QUESTION)[0]
    generated = len(natural.token_ids) - 1  # [DEC] + the answer's tokens, its end token included
    assert natural.token_ids[-1] == m.config.text.sep_token_id  # (the tiny model ends at once: generated == 1)
    done = chat(client, "vqa", data_url(images[0]), QUESTION, max_tokens=generated)
    assert done.choices[0].message.content == natural.text and done.usage.completion_tokens == generated
    assert done.choices[0].finish_reason == "stop"
    cut = chat(client, "captioner", data_url(images[0]), max_tokens=2)
    assert cut.usage.completion_tokens == 2 and cut.choices[0].finish_reason == "length"
