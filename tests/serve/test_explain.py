"""`POST /v1/explain`: the Python API's Grad-CAM maps (`m.explain`), as numbers and as overlay PNGs, and its errors as
4xx naming the field."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from serve_helpers import b64, png_bytes


def ref(image) -> dict[str, str]:
    return {"b64": b64(png_bytes(image))}


def test_explain_equals_the_python_api(client, tiny_models, images):
    text = "Two dogs playing on the beach"
    r = client.post("/v1/explain", json={"image": ref(images[1]), "text": text})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = tiny_models["retrieval"].explain(images[1], text)
    assert body["model"] == "retrieval" and body["layer"] == expected.layer == 0 and body["grid"] == expected.grid
    assert body["score"] == pytest.approx(expected.score, abs=1e-6)
    assert [w["label"] for w in body["words"]] == expected.words == text.split()
    np.testing.assert_allclose(np.array(body["text"]["map"]), expected.text_map, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.array([w["map"] for w in body["words"]]), expected.word_maps, rtol=1e-5, atol=1e-8)
    for shown in [body["text"], *body["words"]]:
        with Image.open(io.BytesIO(base64.b64decode(shown["png"]))) as png:
            assert png.format == "PNG" and max(png.size) == 384
            assert png.size[0] / png.size[1] == pytest.approx(images[1].width / images[1].height, rel=0.02)


def test_explain_errors_name_the_field(client, tiny_models, images):
    cases = [
        ({"text": "a dog", "layer": 1}, "layer", "layer 1 is out of range"),
        ({"text": " ".join(["dog"] * 40)}, "text", "at most 35"),
        ({"text": "a dog", "model": "captioner"}, "model", "cannot"),
        ({"text": "   "}, "text", ""),
    ]
    for extra, field, message in cases:
        r = client.post("/v1/explain", json={"image": ref(images[0]), **extra})
        assert r.status_code == 422, (extra, r.text)
        error = r.json()["error"]
        assert field in (error.get("field") or error["message"]) and message in error["message"], (extra, error)


def test_a_mixed_server_explains_with_blip_and_refuses_blip2(blip2_server, tiny_models, images):
    import httpx

    with httpx.Client(base_url=blip2_server.url, timeout=30, trust_env=False) as client:
        r = client.post("/v1/explain", json={"image": ref(images[0]), "text": "a dog"})  # BLIP-2 "itm" is first
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "retrieval"
        r = client.post("/v1/explain", json={"image": ref(images[0]), "text": "a dog", "model": "itm"})
        assert r.status_code == 422
        error = r.json()["error"]
        assert error["field"] == "model" and "only the Q-Former's query tokens attend to the image" in error["message"]
