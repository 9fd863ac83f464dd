"""The server over real HTTP on 127.0.0.1: every schema gives what the Python API gives; batching, backpressure,
timeouts, auth, CORS, readiness, metrics, access logs and graceful shutdown."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import LiveServer, b64, png_bytes, wait_until

from blip.serve import ServeSettings, create_app

QUESTIONS = [["what is in the picture?", "how many dogs?", "where is the star?"], ["what colour is the sky?"]]


def ref(image) -> dict[str, str]:
    return {"b64": b64(png_bytes(image))}


def hold_batches(app) -> threading.Event:
    """Make the app's model calls wait until the returned event is set."""
    batcher = app.state.service.batcher
    inner, gate = batcher.runner, threading.Event()

    def held(key, payloads):
        assert gate.wait(20)
        return inner(key, payloads)

    batcher.runner = held
    return gate


# --- every schema ---------------------------------------------------------------------------------------------------


def test_caption_json_equals_the_python_api(client, tiny_models, images):
    r = client.post("/v1/caption", json={"images": [ref(images[0]), ref(images[1])]})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = tiny_models["captioner"].caption(images[:2])
    assert body["model"] == "captioner"
    assert [res["captions"][0]["text"] for res in body["results"]] == [c.text for c in expected]
    assert [res["captions"][0]["token_ids"] for res in body["results"]] == [c.token_ids for c in expected]
    assert [res["captions"][0]["score"] for res in body["results"]] == pytest.approx([c.score for c in expected])


def test_caption_generation_options(client, tiny_models, images):
    options = {"num_beams": 3, "num_captions": 2, "prompt": "a picture of", "max_new_tokens": 12}
    r = client.post("/v1/caption", json={"images": [ref(images[2])], **options})
    assert r.status_code == 200, r.text
    got = r.json()["results"][0]["captions"]
    expected = tiny_models["captioner"].caption(images[2], **options)[0]
    assert [c["token_ids"] for c in got] == [c.token_ids for c in expected]
    assert got[0]["text"].startswith("a picture of")

    sampled = {"do_sample": True, "seed": 7, "top_k": 5, "temperature": 0.8}
    first = client.post("/v1/caption", json={"images": [ref(images[0])], **sampled}).json()
    second = client.post("/v1/caption", json={"images": [ref(images[0])], **sampled}).json()
    assert first == second
    alone = tiny_models["captioner"].caption(images[0], **sampled)[0]
    assert first["results"][0]["captions"][0]["token_ids"] == alone.token_ids


def test_vqa_several_questions_per_image(client, tiny_models, images):
    r = client.post("/v1/vqa", json={"images": [ref(images[0]), ref(images[1])], "questions": QUESTIONS})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for image, questions, result in zip(images, QUESTIONS, results):
        expected = tiny_models["vqa"].answer(image, questions)
        assert [a["question"] for a in result["answers"]] == questions
        assert [a["token_ids"] for a in result["answers"]] == [a.token_ids for a in expected]

    candidates = ["yes", "no", "two", "red"]
    r = client.post("/v1/vqa", json={"images": [ref(images[0])], "questions": QUESTIONS[:1], "answers": candidates})
    assert r.status_code == 200, r.text
    expected = tiny_models["vqa"].answer(images[0], QUESTIONS[0], answers=candidates)
    assert [a["text"] for a in r.json()["results"][0]["answers"]] == [a.text for a in expected]


@pytest.mark.parametrize("path", ["/", "/predict"])
def test_model_card_schema(client, tiny_models, images, path):
    body = {"secret_token": "", "inputs": {"texts": QUESTIONS, "images": [ref(images[0]), ref(images[1])]}}
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    expected = [[a.text for a in tiny_models["vqa"].answer(im, qs)] for im, qs in zip(images, QUESTIONS)]
    assert r.json() == {"captions": [{"image_results": answers} for answers in expected]}

    r = client.post(path, json={"inputs": {"images": [ref(images[2])]}})  # no texts: a caption per image
    assert r.status_code == 200, r.text
    assert r.json() == {"captions": [{"image_results": [tiny_models["captioner"].caption(images[2])[0].text]}]}


def test_model_card_schema_caption_only_server(tiny_models, images):
    app = create_app({"captioner": tiny_models["captioner"]}, ServeSettings())
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.post("/predict", json={"inputs": {"images": [ref(images[0]), ref(images[1])]}})
        assert r.status_code == 200, r.text
        assert [x["image_results"] for x in r.json()["captions"]] == [
            [c.text] for c in tiny_models["captioner"].caption(images[:2])
        ]
        r = c.post("/predict", json={"inputs": {"texts": [["what?"]], "images": [ref(images[0])]}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "inputs.texts"
        assert "answer questions" in r.json()["error"]["message"]


def test_azure_ml_schema(client, tiny_models, images):
    encoded = b64(png_bytes(images[1]))
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))  # clients may add newlines
    data = [[b64(png_bytes(images[0]))], [wrapped]]
    r = client.post("/score", json={"input_data": {"columns": ["image"], "index": [0, 1], "data": data}})
    assert r.status_code == 200, r.text
    assert r.json() == [{"text": c.text} for c in tiny_models["captioner"].caption(images[:2])]

    rows = [[b64(png_bytes(images[0])), "what is in the picture?"], [b64(png_bytes(images[1])), "how many dogs?"]]
    rows.append([b64(png_bytes(images[0])), "where is the star?"])
    r = client.post("/score", json={"input_data": {"columns": ["image", "text"], "index": [5, 6, 7], "data": rows}})
    assert r.status_code == 200, r.text
    expected = tiny_models["vqa"].answer([images[0], images[1], images[0]], [row[1] for row in rows])
    assert r.json() == [{"text": a.text} for a in expected]


def test_azure_ml_routing_and_prompts(tiny_models, images):
    """Issue 15.9: with several models, /score goes to the one named by ?model= or by the azureml-model-deployment
    header (when it names a loaded model); a captioning model takes the text column as the caption's prompt (it
    was answered as a question by the VQA model); rows with different prompts each get their own; a caption-only
    server takes ["image", "text"] as prompts; a bad row is named by its index."""
    captioner, vqa = tiny_models["captioner"], tiny_models["vqa"]
    prompts = ["a picture of", "a drawing of", "a picture of", ""]
    rows = [[b64(png_bytes(images[i])), p] for i, p in enumerate(prompts)]
    body = {"input_data": {"columns": ["image", "text"], "index": [4, 5, 6, 7], "data": rows}}
    expected = [captioner.caption(images[i], prompt=p or None)[0].text for i, p in enumerate(prompts)]
    answers = [a.text for a in vqa.answer(images[:3], prompts[:3])]
    app = create_app(tiny_models, ServeSettings())
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.post("/score", params={"model": "captioner"}, json=body)
        assert r.status_code == 200, r.text
        assert [x["text"] for x in r.json()] == expected
        assert r.json()[0]["text"].startswith("a picture of") and r.json()[0] != r.json()[1]
        r = c.post("/score", json=body, headers={"azureml-model-deployment": "captioner"})
        assert [x["text"] for x in r.json()] == expected
        rows_vqa = {"input_data": {"columns": ["image", "text"], "data": rows[:3]}}
        for headers in ({}, {"azureml-model-deployment": "blip-prod-blue"}):  # not a model's name: by columns
            r = c.post("/score", json=rows_vqa, headers=headers)
            assert [x["text"] for x in r.json()] == answers[:3]
        r = c.post("/score", json=rows_vqa, params={"model": "captioner"}, headers={"azureml-model-deployment": "vqa"})
        assert [x["text"] for x in r.json()] == expected[:3]  # the query parameter wins
        images_only = {"input_data": {"columns": ["image"], "data": [row[:1] for row in rows[:2]]}}
        r = c.post("/score", json=images_only, headers={"azureml-model-deployment": "vqa"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "input_data.columns", r.text
        r = c.post("/score", json=images_only, params={"model": "retrieval"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "model", r.text

        def score(data: list[list], **params: str) -> httpx.Response:
            return c.post("/score", params=params, json={"input_data": {"columns": ["image", "text"], "data": data}})

        r = score([*rows[:3], [rows[3][0], "a " * 300]], model="captioner")  # longer than a prompt may be
        assert r.status_code == 422 and r.json()["error"]["field"] == "input_data.data[3][1]", r.text
        r = score([*rows[:3], ["!!not base64!!", "a picture of"]], model="captioner")
        assert r.status_code == 422 and r.json()["error"]["field"] == "input_data.data[3][0]", r.text
        r = c.post("/score", json={"input_data": {"columns": ["image", "text"], "data": [*rows[:3], [rows[0][0]]]}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "input_data.data[3]", r.text
        r = c.post("/score", json={"input_data": {"columns": ["image", "text"], "data": [*rows[:3], [rows[0][0], 5]]}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "input_data.data[3][1]", r.text

    app = create_app({"captioner": captioner}, ServeSettings())
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.post("/score", json=body)
        assert [x["text"] for x in r.json()] == expected


def test_match_and_similarity(client, tiny_models, images):
    texts = ["a red circle on the left", "two dogs on the beach", "a star"]
    r = client.post("/v1/match", json={"images": [ref(images[0])], "texts": texts})
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == pytest.approx(tiny_models["retrieval"].match(images[0], texts), abs=1e-5)

    r = client.post("/v1/match", json={"images": [ref(images[0]), ref(images[1])], "texts": texts[:2]})
    assert r.json()["scores"] == pytest.approx(tiny_models["retrieval"].match(images[:2], texts[:2]), abs=1e-5)

    r = client.post("/v1/similarity", json={"images": [ref(images[0]), ref(images[1])], "texts": texts})
    assert r.status_code == 200, r.text
    expected = tiny_models["retrieval"].similarity(images[:2], texts).tolist()
    assert [x for row in r.json()["scores"] for x in row] == pytest.approx(
        [x for row in expected for x in row], abs=1e-5
    )


def test_multipart_uploads(client, tiny_models, images):
    jpeg = png_bytes(images[3], "JPEG")
    files = [("images", ("photo.jpg", jpeg, "image/jpeg"))]
    from blip.transforms import load_image

    decoded = load_image(jpeg)
    r = client.post("/v1/caption/upload", files=files, data={"num_beams": "2"})
    assert r.status_code == 200, r.text
    assert (
        r.json()["results"][0]["captions"][0]["text"] == tiny_models["captioner"].caption(decoded, num_beams=2)[0].text
    )

    r = client.post("/v1/vqa/upload", files=files, data={"questions": ["what is it?", "how many?"]})
    assert r.status_code == 200, r.text
    expected = tiny_models["vqa"].answer(decoded, ["what is it?", "how many?"])
    assert [a["text"] for a in r.json()["results"][0]["answers"]] == [a.text for a in expected]

    r = client.post("/v1/match/upload", files=files, data={"texts": ["a dog", "a star"]})
    assert r.json()["scores"] == pytest.approx(tiny_models["retrieval"].match(decoded, ["a dog", "a star"]), abs=1e-5)
    r = client.post("/v1/similarity/upload", files=files, data={"texts": ["a dog"]})
    assert r.json()["scores"][0][0] == pytest.approx(
        float(tiny_models["retrieval"].similarity(decoded, "a dog")), abs=1e-5
    )


def test_images_by_url(loopback_server, image_server, tiny_models, images):
    """The local image server stands in for the internet (the loopback opt-in exists for exactly this test)."""
    with httpx.Client(base_url=loopback_server.url, timeout=30) as c:
        url = f"{image_server.url}/image.png"
        r = c.post("/v1/caption", json={"images": [{"url": url}, {"url": f"{image_server.url}/hops/1"}]})
        assert r.status_code == 200, r.text
        expected = tiny_models["captioner"].caption(images[0])[0]
        assert [x["captions"][0]["text"] for x in r.json()["results"]] == [expected.text] * 2
        r = c.post("/score", json={"input_data": {"columns": ["image", "text"], "data": [[url, "what is it?"]]}})
        assert r.json() == [{"text": tiny_models["vqa"].answer(images[0], "what is it?")[0].text}]


# --- service routes -------------------------------------------------------------------------------------------------


def test_models_health_ready_metrics(client, images):
    health = client.get("/healthz").json()
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["captioner", "retrieval", "vqa"]
    assert health["status"] == "ok" and health["models"] == ready.json()["models"]  # issue 15.8: it said []
    models = {m["name"]: m["tasks"] for m in client.get("/v1/models").json()["models"]}
    assert models == {"captioner": ["caption"], "vqa": ["vqa"], "retrieval": ["itc", "itm"]}
    client.post("/v1/caption", json={"images": []})
    pair = {"images": [{"b64": b64(png_bytes(images[0]))}], "texts": ["a dog"]}
    assert client.post("/v1/match", json=pair).status_code == 200  # a batch, whatever ran before
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in (
        "blip_http_requests_total",
        "blip_http_request_duration_seconds_bucket",
        "blip_batch_size_bucket",
        "blip_queue_depth",
        "blip_requests_admitted",
    ):
        assert name in text
    assert 'blip_http_requests_total{route="/v1/caption",method="POST",status="422"}' in text


def test_index_page_and_liveness(client):
    page = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "script-src 'sha256-" in page.headers["content-security-policy"]
    liveness = client.get("/")
    assert liveness.status_code == 200 and liveness.json()["status"] == "ok"


def test_openapi_schema_lists_every_route(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/score", "/", "/predict", "/v1/caption", "/v1/vqa", "/v1/match", "/v1/similarity", "/v1/models"):
        assert path in paths
    assert "/v1/retrieve" in paths and "/v1/indexes" in paths
    for path in ("/v1/caption/upload", "/v1/vqa/upload", "/v1/match/upload", "/v1/similarity/upload"):
        assert "multipart/form-data" in paths[path]["post"]["requestBody"]["content"]
    error = paths["/v1/caption"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert error["$ref"].endswith("/ErrorResponse")
    assert "Retry-After" in paths["/score"]["post"]["responses"]["503"]["headers"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


# --- batching, backpressure, timeouts -------------------------------------------------------------------------------


def test_concurrent_requests_are_merged_and_answered_correctly(tiny_models, images):
    app = create_app(tiny_models, ServeSettings(max_batch=16, max_wait_ms=50))
    gate = hold_batches(app)
    expected = [c.text for c in tiny_models["captioner"].caption(images)]
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:

        def caption(i: int) -> str:
            r = c.post("/v1/caption", json={"images": [ref(images[i % 4])]})
            assert r.status_code == 200, r.text
            return r.json()["results"][0]["captions"][0]["text"]

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(caption, i) for i in range(8)]
            wait_until(lambda: app.state.service.batcher.admitted == 8)
            gate.set()
            texts = [f.result(timeout=30) for f in futures]
        assert texts == [expected[i % 4] for i in range(8)]
        metrics = c.get("/metrics").text
    lines = [
        line for line in metrics.splitlines() if line.startswith('blip_batch_requests_bucket{task="caption",le="1"}')
    ]
    alone = int(lines[0].rsplit(" ", 1)[1])
    count = int(
        next(x for x in metrics.splitlines() if x.startswith('blip_batch_requests_count{task="caption"}')).split()[-1]
    )
    assert count < 8 and alone < count  # fewer model calls than requests: some calls served several requests


def test_full_queue_answers_503_with_retry_after(tiny_models, images):
    app = create_app(tiny_models, ServeSettings(queue_size=2, max_batch=1))
    gate = hold_batches(app)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(c.post, "/v1/caption", json={"images": [ref(images[i])]}) for i in range(2)]
            wait_until(lambda: app.state.service.batcher.admitted == 2)
            r = c.post("/v1/caption", json={"images": [ref(images[2])]})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "overloaded"
            assert c.get("/healthz").status_code == 200  # health stays answerable when busy
            gate.set()
            assert [f.result(timeout=30).status_code for f in held] == [200, 200]
        assert c.post("/v1/caption", json={"images": [ref(images[2])]}).status_code == 200
        assert 'blip_rejected_total{reason="queue_full"} 1' in c.get("/metrics").text


def test_request_timeout_answers_503_and_the_server_recovers(tiny_models, images):
    app = create_app(tiny_models, ServeSettings(timeout_s=0.3))
    gate = hold_batches(app)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.post("/v1/caption", json={"images": [ref(images[0])]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "timeout" and "retry-after" in r.headers
        gate.set()
        wait_until(lambda: app.state.service.batcher.admitted == 0)
        r = c.post("/v1/caption", json={"images": [ref(images[0])]})
        assert r.status_code == 200


def test_images_wait_for_the_in_flight_pixel_budget_then_503(tiny_models, images, monkeypatch):
    """Issue 14.2: decoded pixels in flight are bounded server-wide; an image that does not fit waits (the server
    stays answerable) and, past the request timeout, its request gets 503 with Retry-After; once the budget frees,
    requests go through again."""
    import blip.serve.inputs

    gate = threading.Event()
    decoding = threading.Event()
    real = blip.serve.inputs.load_image

    def held(*args, **kwargs):
        decoding.set()
        assert gate.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(blip.serve.inputs, "load_image", held)
    settings = ServeSettings(max_image_pixels=4096, max_inflight_pixels=6000, timeout_s=1.0)
    app = create_app(tiny_models, settings)
    first, second = (ref(image.resize((64, 64))) for image in images[:2])  # 4096 pixels each: one at a time
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c, ThreadPoolExecutor(1) as pool:
        held_request = pool.submit(c.post, "/v1/caption", json={"images": [first]})
        assert decoding.wait(10)
        start = time.monotonic()
        r = c.post("/v1/caption", json={"images": [second]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "timeout" and r.headers["retry-after"] == "1"
        assert 0.9 < time.monotonic() - start < 5
        assert "blip_decode_waiting 0" in c.get("/metrics").text and c.get("/healthz").status_code == 200
        gate.set()
        assert held_request.result(timeout=30).status_code == 503  # it too ran out of time, while decoding
        both = {"images": [first, second]}  # 8192 pixels in all, one image at a time (retried: a busy machine)
        wait_until(lambda: c.post("/v1/caption", json=both).status_code == 200, 30)
        assert "blip_decode_pixels_in_flight 0" in c.get("/metrics").text


def test_graceful_shutdown_finishes_in_flight_requests(tiny_models, images):
    app = create_app(tiny_models, ServeSettings())
    gate = hold_batches(app)
    live = LiveServer(app).start()
    with httpx.Client(base_url=live.url, timeout=30) as c, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(c.post, "/v1/caption", json={"images": [ref(images[0])]})
        wait_until(lambda: app.state.service.batcher.depth == 1 or app.state.service.batcher.admitted == 1)
        stopper = threading.Thread(target=live.stop)
        stopper.start()  # like SIGTERM: stop accepting, finish what is in flight
        time.sleep(0.2)
        assert stopper.is_alive()
        gate.set()
        response = in_flight.result(timeout=30)
        stopper.join(30)
    assert response.status_code == 200
    assert response.json()["results"][0]["captions"][0]["text"] == tiny_models["captioner"].caption(images[0])[0].text
    assert not live.thread.is_alive()
    assert not app.state.service.batcher.running


# --- readiness, auth, CORS, logs ------------------------------------------------------------------------------------


def test_ready_only_when_models_are_loaded(tiny_models, images):
    loaded = threading.Event()

    def loader():
        assert loaded.wait(20)
        return {"captioner": tiny_models["captioner"]}

    app = create_app(settings=ServeSettings(), loader=loader)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "models are loading"
        r = c.post("/v1/caption", json={"images": [ref(images[0])]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        loaded.set()
        wait_until(lambda: c.get("/readyz").status_code == 200)
        assert c.post("/v1/caption", json={"images": [ref(images[0])]}).status_code == 200


def test_token_auth(tiny_models, images):
    app = create_app(tiny_models, ServeSettings(token="s3cret-token"))
    body = {"images": [ref(images[0])]}
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.post("/v1/caption", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["field"] == "Authorization"
        assert c.post("/v1/caption", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/caption", json=body, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        card = {"inputs": {"images": [ref(images[0])]}}
        assert c.post("/predict", json=card).status_code == 401
        assert c.post("/predict", json={**card, "secret_token": "nope"}).status_code == 401
        assert c.post("/predict", json={**card, "secret_token": "s3cret-token"}).status_code == 200
        assert c.post("/", json=card, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        score = {"input_data": {"columns": ["image"], "data": [[b64(png_bytes(images[0]))]]}}
        assert c.post("/score", json=score).status_code == 401
        assert c.post("/score", json=score, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_cors_is_off_by_default_and_on_when_asked(client, tiny_models):
    origin = {"Origin": "https://example.com"}
    assert "access-control-allow-origin" not in client.get("/healthz", headers=origin).headers
    preflight = {**origin, "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/caption", headers=preflight).headers
    app = create_app(tiny_models, ServeSettings(cors_origins=("https://example.com",), token="t0ken"))
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.options("/v1/caption", headers=preflight)  # a preflight carries no token, even where routes need one
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://example.com"
        other = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        assert "access-control-allow-origin" not in c.options("/v1/caption", headers=other).headers


def test_structured_access_log(client, caplog):
    with caplog.at_level(logging.INFO, logger="blip.serve.access"):
        client.get("/healthz", headers={"X-Request-ID": "test-123"})
        wait_until(lambda: any("test-123" in r.getMessage() for r in caplog.records), 5)
    entry = json.loads(next(r.getMessage() for r in caplog.records if "test-123" in r.getMessage()))
    assert entry["method"] == "GET" and entry["route"] == "/healthz" and entry["status"] == 200
    assert entry["request_id"] == "test-123" and entry["duration_ms"] >= 0


def test_requests_in_progress_are_capped(tiny_models, images):
    app = create_app(tiny_models, ServeSettings(max_connections=1))
    gate = hold_batches(app)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c, ThreadPoolExecutor(1) as pool:
        held = pool.submit(c.post, "/v1/caption", json={"images": [ref(images[0])]})
        wait_until(lambda: app.state.service.batcher.admitted == 1)
        r = c.post("/v1/caption", json={"images": [ref(images[1])]})
        assert r.status_code == 503 and "too many requests in progress" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        assert c.get("/metrics").status_code == 200 and c.get("/readyz").status_code == 200  # exempt
        gate.set()
        assert held.result(timeout=30).status_code == 200


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def test_a_stalled_body_gets_408(tiny_models):
    with LiveServer(create_app(tiny_models, ServeSettings(timeout_s=0.5))) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            head = (
                "POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            )
            sock.sendall(head.encode() + b'{"images": [')  # ...and then nothing more
            start = time.monotonic()
            chunks = [sock.recv(65536)]
            assert time.monotonic() - start < 5
            while not _complete(b"".join(chunks)):
                more = sock.recv(65536)  # the body may come in a later segment
                if not more:
                    break
                chunks.append(more)
            answer = b"".join(chunks).decode()
    status_line, _, rest = answer.partition("\r\n")
    assert " 408 " in status_line
    assert json.loads(rest.split("\r\n\r\n", 1)[1])["error"]["code"] == "body_timeout"
