"""huggingface_hub's own `InferenceClient` against a live `blip serve` (the tiny caption and VQA models): its
image-to-text and visual question answering give what the Python API gives; bad input, a too-long question, a wrong
token, a private URL and too many pixels come back as the client's `HfHubHTTPError` carrying our message."""

from __future__ import annotations

import httpx
import pytest
from PIL import Image
from serve_helpers import LiveServer, b64, png_bytes

from blip.serve import ServeSettings, create_app

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import InferenceClient  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402

TOKEN = "hf-test-token"
QUESTION = "what color is the circle ?"


def client_for(live: LiveServer, path: str = "/hf", token: str | None = TOKEN) -> InferenceClient:
    return InferenceClient(model=f"{live.url}{path}", token=token or False, timeout=30)


def test_image_to_text_equals_the_python_api(guarded, tiny_models, images):
    expected = tiny_models["captioner"].caption(images[0])[0].text
    by_name = client_for(guarded, "/hf/captioner").image_to_text(png_bytes(images[0]))
    assert by_name.generated_text == expected
    # base_url= is model= by another name; /hf picks the first model that captions
    default = InferenceClient(base_url=f"{guarded.url}/hf", api_key=TOKEN, timeout=30)
    assert default.image_to_text(png_bytes(images[0])).generated_text == expected


def test_vqa_equals_the_python_api(guarded, tiny_models, images):
    expected = tiny_models["vqa"].answer(images[1], QUESTION)[0]
    for path in ("/hf/vqa", "/hf"):  # /hf: a question goes to the first model that answers
        answers = client_for(guarded, path).visual_question_answering(png_bytes(images[1]), QUESTION)
        assert [a.answer for a in answers] == [expected.text]
        assert 0.0 < answers[0].score <= 1.0
    top = client_for(guarded, "/hf/vqa").visual_question_answering(png_bytes(images[1]), QUESTION, top_k=3)
    assert len(top) == 3  # the 3 best beams of beam search of width 3, best first
    assert top[0].answer == tiny_models["vqa"].answer(images[1], QUESTION, num_beams=3)[0].text
    assert [a.score for a in top] == sorted((a.score for a in top), reverse=True)
    too_many = client_for(guarded, "/hf/vqa")
    raises_with(
        "parameters.top_k: 9 is over this server's limit of 8",
        lambda: too_many.visual_question_answering(png_bytes(images[1]), QUESTION, top_k=9),
    )


def test_json_forms_with_parameters(guarded, tiny_models, images):
    m = tiny_models["captioner"]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"inputs": b64(png_bytes(images[2])), "parameters": {"max_new_tokens": 6}}
    body["parameters"]["generation_parameters"] = {"num_beams": 3, "length_penalty": 0.5}
    r = httpx.post(f"{guarded.url}/hf/captioner", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    expected = m.caption(images[2], num_beams=3, max_new_tokens=6, length_penalty=0.5)[0].text
    assert r.json() == [{"generated_text": expected}]
    # the nested VQA form of the Inference API's documentation; a data: URL as the image
    nested = {"inputs": {"image": f"data:image/png;base64,{b64(png_bytes(images[3]))}", "question": QUESTION}}
    r = httpx.post(f"{guarded.url}/hf/vqa", json=nested, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert [a["answer"] for a in r.json()] == [tiny_models["vqa"].answer(images[3], QUESTION)[0].text]
    # an unknown generation parameter is named
    body["parameters"]["generation_parameters"] = {"typical_p": 0.5}
    r = httpx.post(f"{guarded.url}/hf/captioner", json=body, headers=headers, timeout=30)
    assert r.status_code == 400 and "typical_p" in r.json()["error"], r.text


def raises_with(message: str, call) -> HfHubHTTPError:
    with pytest.raises(HfHubHTTPError) as caught:
        call()
    assert message in str(caught.value), str(caught.value)
    return caught.value


def test_bad_image_too_long_question_and_wrong_token(guarded, images):
    client = client_for(guarded, "/hf/captioner")
    error = raises_with("inputs: not an image in an accepted format", lambda: client.image_to_text(b"not an image"))
    assert error.response.status_code == 400
    long_question = "what " * 60  # 300 characters, over the limit of 200
    vqa = client_for(guarded, "/hf/vqa")
    error = raises_with(
        "question: 300 characters, over the limit of 200",
        lambda: vqa.visual_question_answering(png_bytes(images[0]), long_question),
    )
    assert error.response.status_code == 400
    for path in ("/hf/captioner", "/hf"):  # checked by the route, and by the middleware before the body is read
        wrong = client_for(guarded, path, token="not-the-token")
        error = raises_with("missing or wrong bearer token", lambda c=wrong: c.image_to_text(png_bytes(images[0])))
        assert error.response.status_code == 401
    unknown = client_for(guarded, "/hf/nope")
    error = raises_with("no model named 'nope'", lambda: unknown.image_to_text(png_bytes(images[0])))
    assert error.response.status_code == 404
    ask = lambda: client.visual_question_answering(png_bytes(images[0]), QUESTION)  # noqa: E731
    error = raises_with("cannot answer questions", ask)
    assert error.response.status_code == 400


def test_pixel_limit_holds(guarded):
    png = png_bytes(Image.new("RGB", (100, 100), "red"))  # 10000 pixels, over 64 * 64
    error = raises_with("inputs", lambda: client_for(guarded, "/hf/captioner").image_to_text(png))
    assert error.response.status_code == 413


def test_private_urls_are_refused(server, image_server):
    """The safe fetcher refuses a loopback URL given as the image; nothing is fetched."""
    before = list(server.recorder.urls)
    url = f"{image_server.url}/image.png"
    for path, body in (("/hf/captioner", {"inputs": url}), ("/hf/vqa", {"inputs": {"image": url, "question": "what"}})):
        r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error_type"] == "url_refused" and "127.0.0.1" in r.json()["error"]
    assert server.recorder.urls == before


def test_the_middleware_asks_for_the_token_on_every_hf_path(tiny_models):
    """/hf/{model} is refused by the middleware before its body is read, as /hf is (a path template is no path)."""
    from fastapi.testclient import TestClient

    app = create_app(tiny_models, ServeSettings(token=TOKEN))
    with TestClient(app) as c:
        rejected = app.state.service.metrics.rejected
        for path in ("/hf", "/hf/captioner", "/hf/nope"):
            before = rejected.value(reason="unauthorized")
            r = c.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
            assert r.status_code == 401 and r.json()["error_type"] == "unauthorized", (path, r.text)
            assert rejected.value(reason="unauthorized") == before + 1, path
