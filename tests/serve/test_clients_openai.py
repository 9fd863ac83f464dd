"""The `openai` Python client against a live `blip serve` (the tiny caption and VQA models): chat completions give
what the Python API gives with the same options, streaming gives the same text, n and seed behave, the model list
reads, and bad input, a too-long prompt, a wrong token, an unknown model, a private URL and too many pixels come back
as the client's own exceptions carrying our message."""

from __future__ import annotations

import io

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
def guarded(tiny_models):
    """The tiny models behind a token, with small text and pixel limits."""
    settings = ServeSettings(token=TOKEN, max_text_chars=200, max_image_pixels=64 * 64, max_wait_ms=5.0)
    with LiveServer(create_app(tiny_models, settings)) as live:
        yield live


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


def test_streaming_gives_the_same_text(client, images):
    for model, text in (("captioner", PROMPT), ("vqa", QUESTION)):
        whole = chat(client, model, data_url(images[3]), text).choices[0].message.content
        stream = chat(client, model, data_url(images[3]), text, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == len(whole.split())
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


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
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100), "red").save(buffer, "PNG")  # 10000 pixels, over 64 * 64
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client, "captioner", f"data:image/png;base64,{b64(buffer.getvalue())}")
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
    """InferenceClient(base_url=server).chat_completion posts to /v1/chat/completions too."""
    hf = pytest.importorskip("huggingface_hub")
    client = hf.InferenceClient(base_url=guarded.url, api_key=TOKEN, timeout=30)
    done = client.chat_completion(messages=user(data_url(images[1]), QUESTION), model="vqa")
    assert done.choices[0].message.content == tiny_models["vqa"].answer(images[1], QUESTION)[0].text


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
