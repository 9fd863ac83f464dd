"""Fixtures for the server tests: tiny models, live servers on 127.0.0.1, a local image server, and a small image
collection embedded and indexed by `blip batch embed` (served by `retrieval_server`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402
from serve_helpers import ImageServer, LiveServer, RecordingTransport, guarded_server, png_bytes  # noqa: E402

import blip  # noqa: E402
from blip.fetch import FetchLimits, SafeFetcher  # noqa: E402
from blip.serve import ServeSettings, create_app  # noqa: E402
from oracle import TinySpec, make_images  # noqa: E402

CAPTION = TinySpec(kind="caption", seed=31)
VQA = TinySpec(kind="vqa", seed=32)
RETRIEVAL = TinySpec(kind="retrieval", seed=33)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives the web page in headless Chromium (Playwright)")
    config.addinivalue_line("markers", "schemathesis: property-based API tests generated from the OpenAPI schema")


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return make_images(4, seed=11)


@pytest.fixture(scope="session")
def tiny_models(hf_checkpoints) -> dict[str, blip.Blip]:
    return {
        "captioner": blip.load(hf_checkpoints(CAPTION)),
        "vqa": blip.load(hf_checkpoints(VQA)),
        "retrieval": blip.load(hf_checkpoints(RETRIEVAL)),
    }


@pytest.fixture(scope="session")
def blip2_models(tmp_path_factory) -> dict[str, blip.Blip]:
    """Tiny BLIP-2 checkpoints of each kind (random weights, built with transformers), loaded by `blip.load`."""
    pytest.importorskip("transformers")
    from oracle_blip2 import Blip2Spec, build_blip2_checkpoint

    made = {}
    for name, kind, seed in (("opt", "opt", 51), ("t5", "t5", 52), ("itm", "retrieval", 53)):
        folder = build_blip2_checkpoint(tmp_path_factory.mktemp(f"serve_{kind}"), Blip2Spec(kind=kind, seed=seed))
        made[name] = blip.load(folder)
    return made


@pytest.fixture(scope="session")
def nlvr_model(tmp_path_factory) -> blip.Blip:
    """A tiny NLVR2 model (original-layout file, random weights), for /v1/reason."""
    from nlvr_helpers import write_nlvr_checkpoint

    path, tokenizer, _ = write_nlvr_checkpoint(tmp_path_factory.mktemp("serve_nlvr"), seed=61)
    return blip.load(path, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def mixed_models(blip2_models, tiny_models, nlvr_model) -> dict[str, blip.Blip]:
    """BLIP-2 models first (a request naming no model gets a BLIP-2 one), then the BLIP ones (NLVR2 last)."""
    return {**blip2_models, **tiny_models, "nlvr": nlvr_model}


@pytest.fixture(scope="session")
def blip2_server(mixed_models, collection_dir) -> Iterator[LiveServer]:
    """Like `retrieval_server`, with `mixed_models`: BLIP-2 and BLIP models in one server (the index goes with
    BLIP's retrieval model, which embedded it)."""
    recorder = RecordingTransport()
    fetcher = SafeFetcher(FetchLimits(read_timeout_s=2.0, total_timeout_s=4.0), transport=recorder)
    settings = ServeSettings(max_wait_ms=20.0)
    app = create_app(mixed_models, settings, fetcher=fetcher, indexes={"shapes": collection_dir})
    with LiveServer(app) as live:
        live.recorder = recorder
        yield live


@pytest.fixture(scope="session")
def server(tiny_models) -> Iterator[LiveServer]:
    """All three tiny models, production settings: loopback URLs are refused like any private address.
    `server.recorder` lists every connection its fetcher attempted (there should be none)."""
    recorder = RecordingTransport()
    settings = ServeSettings(max_wait_ms=20.0)
    fetcher = SafeFetcher(FetchLimits(read_timeout_s=2.0, total_timeout_s=4.0), transport=recorder)
    with LiveServer(create_app(tiny_models, settings, fetcher=fetcher)) as live:
        live.recorder = recorder
        yield live


@pytest.fixture(scope="session")
def collection_dir(hf_checkpoints, tmp_path_factory) -> Path:
    """Eight images embedded by the tiny retrieval model with `blip batch embed` (flat index), in <dir>/index."""
    from blip.jobs.cli import batch_main

    root = tmp_path_factory.mktemp("collection")
    folder = root / "images"
    folder.mkdir()
    for i, image in enumerate(make_images(8, seed=21)):
        image.save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    out = root / "embedded"
    argv = ["embed", "-m", str(hf_checkpoints(RETRIEVAL)), "-i", str(folder), "-o", str(out), "--index", "flat"]
    assert batch_main([*argv, "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def retrieval_server(tiny_models, nlvr_model, collection_dir) -> Iterator[LiveServer]:
    """Like `server` (the same models, and the NLVR2 one, and settings), and serving `collection_dir` as the index
    "shapes"."""
    recorder = RecordingTransport()
    fetcher = SafeFetcher(FetchLimits(read_timeout_s=2.0, total_timeout_s=4.0), transport=recorder)
    models = {**tiny_models, "nlvr": nlvr_model}
    app = create_app(models, ServeSettings(max_wait_ms=20.0), fetcher=fetcher, indexes={"shapes": collection_dir})
    with LiveServer(app) as live:
        live.recorder = recorder
        yield live


@pytest.fixture(scope="session")
def loopback_server(tiny_models) -> Iterator[LiveServer]:
    """Like `server`, but its fetcher may reach 127.0.0.1, where the local image server stands in for the internet."""
    recorder = RecordingTransport()
    limits = FetchLimits(max_bytes=256 * 1024, max_redirects=2, read_timeout_s=0.5, total_timeout_s=2.0)
    fetcher = SafeFetcher(limits, allow_loopback=True, transport=recorder)
    with LiveServer(create_app(tiny_models, ServeSettings(), fetcher=fetcher)) as live:
        live.recorder = recorder
        yield live


@pytest.fixture(scope="session")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as c:
        yield c


@pytest.fixture(scope="session")
def image_server(images) -> Iterator[ImageServer]:
    served = ImageServer(png_bytes(images[0]))
    yield served
    served.close()


@pytest.fixture(scope="module")
def guarded(tiny_models, request):
    """The tiny models behind the test module's `TOKEN`, with small text and pixel limits (the client tests)."""
    with guarded_server(tiny_models, request.module.TOKEN) as live:
        yield live
