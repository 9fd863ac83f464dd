"""`POST /v1/retrieve` over a video collection (`blip batch embed --input videos/`): the same hits, ITC and ITM
scores as `search_texts` / `blip retrieve` (ITM over each hit's concatenated frames); a video that became unreadable
after indexing drops out of the re-ranking instead of failing the request."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from serve_helpers import LiveServer

from blip.serve import ServeSettings, create_app
from blip.tasks.retrieval import load_collection_index, search_texts
from conftest import RETRIEVAL
from video_helpers import write_colour_clip

COLOURS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 210, 40), (140, 60, 180)]


@pytest.fixture(scope="module")
def video_collection(hf_checkpoints, tmp_path_factory) -> Path:
    from blip.jobs.cli import batch_main

    root = tmp_path_factory.mktemp("video_collection")
    for i, colour in enumerate(COLOURS):
        write_colour_clip(root / "clips" / f"clip{i}.{('mp4', 'webm')[i % 2]}", [colour] * (4 + i))
    out = root / "embedded"
    argv = ["embed", "-m", str(hf_checkpoints(RETRIEVAL)), "-i", str(root / "clips"), "-o", str(out), "--frames", "4"]
    assert batch_main([*argv, "--device", "cpu", "--workers", "1", "--no-progress"]) == 0
    return out


def test_video_index_served(tiny_models, video_collection):
    collection = load_collection_index(video_collection)
    assert collection.media == "video"
    app = create_app(tiny_models, ServeSettings(max_wait_ms=20.0), indexes={"clips": video_collection})
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30, trust_env=False) as client:
        for query, rerank in (("a red square moves to the left", True), ("a green circle", False)):
            r = client.post("/v1/retrieve", json={"index": "clips", "text": query, "top_k": 3, "rerank": rerank})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["reranked"] is rerank and body["query"] == "text"
            want = search_texts(tiny_models["retrieval"], collection, [query], top_k=3, rerank=rerank)[0]
            assert [h["image"] for h in body["results"]] == [h.image for h in want]
            assert [h["itc_score"] for h in body["results"]] == pytest.approx([h.itc for h in want], abs=1e-5)
            if rerank:
                assert [h["itm_score"] for h in body["results"]] == pytest.approx([h.itm for h in want], abs=1e-5)

        # a clip deleted after indexing cannot be re-ranked: it drops out, the request still answers
        (video_collection.parent / "clips" / "clip0.mp4").unlink()
        r = client.post("/v1/retrieve", json={"index": "clips", "text": "a red square", "top_k": 5})
        assert r.status_code == 200 and [h["image"] for h in r.json()["results"]].count("clip0.mp4") == 0
        assert len(r.json()["results"]) == 4
