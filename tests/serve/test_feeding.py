"""Feeding the model: image decoding (and large base64) off the event loop, decoded images handed to the model as
8-bit pixels, larger micro-batches on a GPU."""

from __future__ import annotations

import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import LiveServer, b64, png_bytes

from blip.serve import ServeSettings, create_app
from blip.serve import inputs as serve_inputs
from blip.serve.cli import build_parser, forward_batch, settings_from_args
from blip.serve.settings import CUDA_MAX_BATCH, DEFAULT_MAX_BATCH
from blip.tasks import common
from blip.transforms import PreparedImage

SLOW_DECODE_S = 1.5


@pytest.fixture
def slow_server(tiny_models, monkeypatch):
    """A server whose image decoder takes `SLOW_DECODE_S` per image (and records the threads it decodes on)."""
    real = serve_inputs.load_image
    decode_threads: list[str] = []

    def slow_load(*args, **kwargs):
        decode_threads.append(threading.current_thread().name)
        time.sleep(SLOW_DECODE_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_inputs, "load_image", slow_load)
    app = create_app({"captioner": tiny_models["captioner"]}, ServeSettings(max_wait_ms=5.0))
    with LiveServer(app) as live:
        live.decode_threads = decode_threads
        yield live


def test_a_slow_decode_does_not_block_the_event_loop(slow_server, images):
    answers: list[httpx.Response] = []
    body = {"images": [{"b64": b64(png_bytes(images[0]))}]}
    request = threading.Thread(
        target=lambda: answers.append(httpx.post(f"{slow_server.url}/v1/caption", json=body, timeout=30))
    )
    request.start()
    deadline = time.monotonic() + 10
    while not slow_server.decode_threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slow_server.decode_threads, "the request never reached the decoder"
    latencies = []
    with httpx.Client(base_url=slow_server.url, timeout=5) as client:
        for _ in range(5):  # all while the image is being decoded
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
    request.join(30)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert sum(latencies) < SLOW_DECODE_S * 0.8, latencies  # answered while the decode was still running
    assert max(latencies) < 0.5, latencies
    assert slow_server.decode_threads[0] != slow_server.thread.name  # not the event loop's thread


def test_large_base64_is_decoded_off_the_event_loop(tiny_models, images, monkeypatch):
    real = serve_inputs.decode_base64
    threads: list[str] = []

    def recording(text, field):
        threads.append(threading.current_thread().name)
        return real(text, field)

    monkeypatch.setattr(serve_inputs, "decode_base64", recording)
    noise = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    big = io.BytesIO()
    Image.fromarray(noise).save(big, format="PNG")
    assert len(b64(big.getvalue())) > serve_inputs.INLINE_BASE64_CHARS
    app = create_app({"captioner": tiny_models["captioner"]}, ServeSettings(max_wait_ms=5.0))
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        small = client.post("/v1/caption", json={"images": [{"b64": b64(png_bytes(images[0]))}]})
        large = client.post("/v1/caption", json={"images": [{"b64": b64(big.getvalue())}]})
        loop_thread = live.thread.name
    assert small.status_code == 200 and large.status_code == 200, (small.text, large.text)
    assert threads[0] == loop_thread  # a small one inline: a thread hop costs more than the decode
    assert threads[1] != loop_thread


def test_the_model_gets_prepared_pixels_and_the_same_captions(server, tiny_models, images, monkeypatch):
    seen: list[list[type]] = []
    real = common.image_input

    def spy(blip, batch, model):
        seen.append([type(im) for im in batch])
        return real(blip, batch, model)

    monkeypatch.setattr(common, "image_input", spy)
    import blip.tasks.caption as caption_module

    monkeypatch.setattr(caption_module, "image_input", spy)
    body = {"images": [{"b64": b64(png_bytes(im))} for im in images[:3]], "model": "captioner"}
    response = httpx.post(f"{server.url}/v1/caption", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert seen == [[PreparedImage] * 3]  # the server's decode threads prepared them
    served = [r["captions"][0]["text"] for r in response.json()["results"]]
    assert served == [c.text for c in tiny_models["captioner"].caption(images[:3])]  # the Python API, from PIL


def test_batch_rows_by_device_and_flags():
    assert ServeSettings().batch_rows("cpu") == DEFAULT_MAX_BATCH == 16
    assert ServeSettings().batch_rows("cuda:0") == CUDA_MAX_BATCH == 64
    assert ServeSettings(max_batch=8).batch_rows("cuda") == 8  # given: kept everywhere
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        ServeSettings(max_batch=0)
    parse = build_parser().parse_args
    assert settings_from_args(parse(["--model", "x"])).max_batch is None
    assert settings_from_args(parse(["--model", "x", "--max-batch", "32"])).max_batch == 32
    assert forward_batch(parse(["--model", "x"]), "cuda:0") == 64
    assert forward_batch(parse(["--model", "x"]), "cpu") == 16
    assert forward_batch(parse(["--model", "x", "--max-batch", "24"]), "cuda") == 24
    assert forward_batch(parse(["--model", "x", "--batch-size", "5"]), "cuda") == 5
    assert forward_batch(parse(["--model", "x", "--no-batching"]), "cuda") == 16


def test_a_server_on_the_cpu_batches_16_rows(server):
    assert server.app.state.service.batcher.max_batch == 16
