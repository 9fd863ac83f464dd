"""Bad input, over real HTTP: every malformed, hostile or oversized request gets a 4xx (or 503) JSON error naming the
field at fault; the server stays up and correct, and its memory does not grow over repeated bad requests.

Traffic goes to 127.0.0.1 only. URLs to private or public addresses are refused before any connection: each server's
fetcher uses a recording transport that fails on any non-loopback connection, and the tests check it saw none."""

from __future__ import annotations

import struct
import time
import zlib

import httpx
import pytest
from serve_helpers import LiveServer, b64, png_bytes, png_variant, rss_bytes

from blip.serve import ServeSettings, create_app


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height (400 megapixels here) that compresses to ~50 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> str:
    return b64(png_bomb())


@pytest.fixture(scope="module")
def good(images) -> dict[str, str]:
    return {"b64": b64(png_bytes(images[0]))}


def check_error(response: httpx.Response, status: int | tuple[int, ...], field: str | None, *words: str) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field"}
    if field is not None:
        assert error["field"] == field, error
        assert error["message"].startswith(field), error
    for word in words:
        assert word.lower() in error["message"].lower(), error
    return error


# --- malformed requests ---------------------------------------------------------------------------------------------

RAW_CASES = [
    ("/v1/caption", b"{", 400, "body", "not valid JSON"),
    ("/v1/caption", b"hello", 400, "body", "not valid JSON"),
    ("/v1/caption", b"", 422, "body", "required"),
    ("/v1/caption", b"[1, 2]", 422, "body", "dictionary"),
    ("/v1/caption", b'{"images": [{"b64": "AAAA"}], "temperature": NaN}', 422, "temperature", "finite"),
    ("/predict", b'{"inputs": ', 400, "body", "not valid JSON"),
    ("/score", b'{"input_data": {"columns": ["image"], "data": [["x"]]}', 400, "body", "not valid JSON"),
]


@pytest.mark.parametrize("path, body, status, field, words", RAW_CASES)
def test_malformed_bodies(client, path, body, status, field, words):
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    check_error(response, status, field, words)


def json_cases(good: dict[str, str], bomb: str) -> list[tuple[str, str, object, int, str | None, tuple[str, ...]]]:
    png = b64(png_bytes(__import__("PIL.Image").Image.new("RGB", (16, 16), "red")))
    truncated = b64(png_bytes(__import__("PIL.Image").Image.new("RGB", (64, 64), "blue"))[:80])
    caption = "/v1/caption"
    return [
        # wrong types and missing fields
        ("images not a list", caption, {"images": "abc"}, 422, "images", ("list",)),
        ("b64 not a string", caption, {"images": [{"b64": 5}]}, 422, "images[0].b64", ("string",)),
        ("beams not an int", caption, {"images": [good], "num_beams": "many"}, 422, "num_beams", ("integer",)),
        ("missing images", caption, {}, 422, "images", ("required",)),
        ("neither url nor b64", caption, {"images": [{}]}, 422, "images[0]", ("exactly one",)),
        ("both url and b64", caption, {"images": [{**good, "url": "https://x.test/a.png"}]}, 422, "images[0]", ()),
        ("unknown field", caption, {"images": [good], "bogus": 1}, 422, "bogus", ("not permitted",)),
        ("card missing inputs", "/predict", {"secret_token": "x"}, 422, "inputs", ("required",)),
        ("card url type", "/predict", {"inputs": {"images": [{"url": 3}]}}, 422, "inputs.images[0].url", ()),
        ("card texts type", "/", {"inputs": {"texts": "what?", "images": [good]}}, 422, "inputs.texts", ()),
        ("azure columns type", "/score", {"input_data": {"columns": "image", "data": [["x"]]}}, 422, None, ()),
        ("azure missing data", "/score", {"input_data": {"columns": ["image"]}}, 422, "input_data.data", ()),
        # empty lists and empty questions
        ("empty images", caption, {"images": []}, 422, "images", ("at least 1",)),
        ("card empty images", "/predict", {"inputs": {"images": []}}, 422, "inputs.images", ("at least 1",)),
        ("azure empty data", "/score", {"input_data": {"columns": ["image"], "data": []}}, 422, "input_data.data", ()),
        ("card empty question list", "/", {"inputs": {"texts": [[]], "images": [good]}}, 422, "inputs.texts[0]", ()),
        ("card empty question", "/", {"inputs": {"texts": [[""]], "images": [good]}}, 422, "inputs.texts[0][0]", ()),
        ("card blank question", "/", {"inputs": {"texts": [["  "]], "images": [good]}}, 422, "inputs.texts[0][0]", ()),
        ("vqa empty question", "/v1/vqa", {"images": [good], "questions": [["ok?", ""]]}, 422, "questions[0][1]", ()),
        ("match no texts", "/v1/match", {"images": [good], "texts": []}, 422, "texts", ()),
        (
            "azure empty question",
            "/score",
            {"input_data": {"columns": ["image", "text"], "data": [[good["b64"], " "]]}},
            422,
            "input_data.data[0][1]",
            ("empty",),
        ),
        # schema-level consistency
        (
            "azure bad columns",
            "/score",
            {"input_data": {"columns": ["text"], "data": [["x"]]}},
            422,
            "input_data.columns",
            (),
        ),
        (
            "azure index mismatch",
            "/score",
            {"input_data": {"columns": ["image"], "index": [1, 2], "data": [[good["b64"]]]}},
            422,
            "input_data.index",
            (),
        ),
        (
            "azure short row",
            "/score",
            {"input_data": {"columns": ["image", "text"], "data": [[good["b64"]]]}},
            422,
            "input_data.data[0]",
            (),
        ),
        (
            "card texts count",
            "/predict",
            {"inputs": {"texts": [["a?"], ["b?"]], "images": [good]}},
            422,
            "inputs.texts",
            (),
        ),
        ("vqa lists count", "/v1/vqa", {"images": [good], "questions": [["a?"], ["b?"]]}, 422, "questions", ()),
        ("match pairing", "/v1/match", {"images": [good, good], "texts": ["a", "b", "c"]}, 422, "texts", ()),
        # images that are not images
        ("bad base64", caption, {"images": [{"b64": "!!not base64!!"}]}, 422, "images[0].b64", ("base64",)),
        ("text bytes", caption, {"images": [{"b64": b64(b"hello, I am text")}]}, 422, "images[0].b64", ("image",)),
        ("html bytes", caption, {"images": [{"b64": b64(b"<html><body>x</body></html>")}]}, 422, "images[0].b64", ()),
        ("truncated png", caption, {"images": [{"b64": truncated}]}, 422, "images[0].b64", ("truncated",)),
        (
            "png bomb",
            caption,
            {"images": [{"b64": bomb}]},
            413,
            "images[0].b64",
            ("400000000 pixels", "before decoding"),
        ),
        ("bomb in card", "/predict", {"inputs": {"images": [{"b64": bomb}]}}, 413, "inputs.images[0].b64", ()),
        (
            "bomb in azure",
            "/score",
            {"input_data": {"columns": ["image"], "data": [[bomb]]}},
            413,
            "input_data.data[0][0]",
            ("before decoding",),
        ),
        # URLs that must never be fetched
        ("loopback url", caption, {"images": [{"url": "http://127.0.0.1:8000/x.png"}]}, 422, "images[0].url", ()),
        ("private url", caption, {"images": [{"url": "http://10.0.0.1/x.png"}]}, 422, "images[0].url", ("private",)),
        (
            "metadata url",
            "/predict",
            {"inputs": {"images": [{"url": "http://169.254.169.254/latest/meta-data/"}]}},
            422,
            "inputs.images[0].url",
            ("link-local",),
        ),
        ("ipv6 loopback", caption, {"images": [{"url": "http://[::1]:8000/x.png"}]}, 422, "images[0].url", ()),
        ("mapped loopback", caption, {"images": [{"url": "http://[::ffff:127.0.0.1]/"}]}, 422, "images[0].url", ()),
        ("file url", caption, {"images": [{"url": "file:///etc/passwd"}]}, 422, "images[0].url", ("http",)),
        ("data url", caption, {"images": [{"url": f"data:image/png;base64,{png}"}]}, 422, "images[0].url", ()),
        ("data url as b64", caption, {"images": [{"b64": f"data:image/png;base64,{png}"}]}, 422, "images[0].b64", ()),
        (
            "azure private url",
            "/score",
            {"input_data": {"columns": ["image"], "data": [["http://10.1.2.3/cat.jpg"]]}},
            422,
            "input_data.data[0][0]",
            ("private",),
        ),
        (
            "azure file url",
            "/score",
            {"input_data": {"columns": ["image"], "data": [["file:///etc/passwd"]]}},
            422,
            "input_data.data[0][0]",
            ("http",),
        ),
        # limits and options
        ("too many images", caption, {"images": [good] * 17}, 422, "images", ("limit of 16",)),
        ("too many tokens", caption, {"images": [good], "max_new_tokens": 100}, 422, "max_new_tokens", ("limit",)),
        ("zero beams", caption, {"images": [good], "num_beams": 0}, 422, "num_beams", ()),
        ("greedy captions", caption, {"images": [good], "num_captions": 3}, 422, "num_captions", ()),
        ("beam sampling", caption, {"images": [good], "num_beams": 2, "do_sample": True}, 422, "num_beams", ()),
        ("top_p zero", caption, {"images": [good], "top_p": 0}, 422, "top_p", ()),
        (
            "min over max",
            caption,
            {"images": [good], "min_new_tokens": 9, "max_new_tokens": 5},
            422,
            "min_new_tokens",
            (),
        ),
        ("long prompt", caption, {"images": [good], "prompt": "a " * 400}, 422, None, ()),
        ("unknown model", caption, {"images": [good], "model": "nope"}, 422, "model", ("no model named",)),
        ("wrong task", caption, {"images": [good], "model": "vqa"}, 422, "model", ("cannot caption",)),
        (
            "too many questions",
            "/v1/vqa",
            {"images": [good], "questions": [["q?"] * 65]},
            422,
            "questions",
            ("limit",),
        ),
    ]


def test_bad_json_requests(client, server, good, bomb):
    for name, path, body, status, field, words in json_cases(good, bomb):
        response = client.post(path, json=body)
        try:
            check_error(response, status, field, *words)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from e
    assert server.recorder.urls == []  # not one connection attempted, not even to loopback


def test_request_pixel_budget(client, server):
    """Five 25-megapixel images (each under the per-image cap) are over the request's 100 MP: 413, naming the image
    that crosses it, before any is decoded; in every schema."""
    png = png_bomb(5000, 5000)  # 1-bit: a few KB each
    encoded = [b64(png_variant(png, i)) for i in range(5)]
    cases = [
        ("/v1/caption", {"images": [{"b64": e} for e in encoded]}, "images[4].b64"),
        ("/predict", {"inputs": {"images": [{"b64": e} for e in encoded]}}, "inputs.images[4].b64"),
        ("/score", {"input_data": {"columns": ["image"], "data": [[e] for e in encoded]}}, "input_data.data[4][0]"),
    ]
    for path, body, field in cases:
        start = time.monotonic()
        error = check_error(client.post(path, json=body), 413, field, "125000000 pixels", "per request")
        assert error["code"] == "too_many_pixels" and time.monotonic() - start < 5
    r = client.post("/v1/caption", json={"images": [{"b64": e} for e in encoded[:4]]})  # 100 MP: within it
    assert r.status_code == 200, r.text


def test_bad_uploads(client):
    r = client.post(
        "/v1/caption/upload", content=b"garbage", headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    check_error(r, 400, "body")
    check_error(client.post("/v1/caption/upload", data={"num_beams": "2"}), 422, "images", "required")
    files = [("images", ("a.png", b"not an image at all", "image/png"))]
    check_error(client.post("/v1/caption/upload", files=files), 422, "images[0]", "not an image")
    check_error(client.post("/v1/vqa/upload", files=files, data={"questions": [""]}), 422, "questions[0]")
    check_error(client.post("/v1/caption/upload", files=files, data={"num_beams": "x"}), 422, "num_beams")


def test_unknown_routes_and_methods(client):
    check_error(client.get("/v1/caption"), 405, None)
    check_error(client.post("/v2/anything", json={}), 404, None)


def test_url_fetch_failures(loopback_server, image_server, good):
    """Through a server whose fetcher may reach the local image server: redirect to a private address, a slow
    server, too many redirects, too large, not an image."""
    base = image_server.url
    cases = [
        (f"{base}/to?url=http://10.0.0.1/x.png", 422, ("redirect 1", "private"), "url_refused"),
        (f"{base}/to?url=http://169.254.169.254/latest/meta-data/", 422, ("link-local",), "url_refused"),
        (f"{base}/to?url=file:///etc/passwd", 422, ("http",), "url_refused"),
        (f"{base}/slow?s=2", 422, ("timed out",), "fetch_timeout"),
        (f"{base}/hops/5", 422, ("more than 2 redirects",), "too_many_redirects"),
        (f"{base}/big", 413, ("over the limit",), "too_large"),
        (f"{base}/big-chunked", 413, ("over the limit",), "too_large"),
        (f"{base}/as-html.png", 422, ("HTML",), "invalid_image"),
        (f"{base}/missing.png", 422, ("HTTP 404",), "fetch_failed"),
    ]
    with httpx.Client(base_url=loopback_server.url, timeout=30) as c:
        for url, status, words, code in cases:
            start = time.monotonic()
            error = check_error(c.post("/v1/caption", json={"images": [{"url": url}]}), status, "images[0].url", *words)
            assert error["code"] == code, (url, error)
            assert time.monotonic() - start < 5
        r = c.post("/v1/caption", json={"images": [good]})
        assert r.status_code == 200
    hosts = {httpx.URL(u).host for u in loopback_server.recorder.urls}
    assert hosts == {"127.0.0.1"}  # the redirects to private addresses were never followed


@pytest.fixture(scope="module")
def small_body_server(tiny_models):
    with LiveServer(create_app(tiny_models, ServeSettings(max_body_bytes=64 * 1024))) as live:
        yield live


def test_huge_bodies(small_body_server, good):
    with httpx.Client(base_url=small_body_server.url, timeout=30) as c:
        big = {"images": [{"b64": "A" * 100_000}]}
        check_error(c.post("/v1/caption", json=big), 413, "body", "over the limit")

        def chunks():  # no Content-Length: the cap is enforced while reading
            yield b'{"images": [{"b64": "'
            for _ in range(20):
                yield b"A" * 8192
            yield b'"}]}'

        response = c.post("/v1/caption", content=chunks(), headers={"Content-Type": "application/json"})
        check_error(response, 413, "body", "over the limit")
        assert c.post("/v1/caption", json={"images": [good]}).status_code == 200


def test_server_alive_and_correct_after_bad_input(client, tiny_models, images, good):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    r = client.post("/v1/caption", json={"images": [good]})
    assert r.status_code == 200
    assert r.json()["results"][0]["captions"][0]["text"] == tiny_models["captioner"].caption(images[0])[0].text


def test_memory_does_not_grow_over_repeated_bad_requests(client, small_body_server, bomb, good):
    if rss_bytes() is None:
        pytest.skip("needs /proc/self/statm to read the resident set size")
    truncated = b64(png_bytes(__import__("PIL.Image").Image.new("RGB", (256, 256), "green"))[:300])
    bodies = [
        {"images": [{"b64": bomb}]},
        {"images": [{"b64": truncated}]},
        {"images": [{"b64": "!!!"}]},
        {"images": [{"url": "http://10.0.0.1/x.png"}]},
        {"images": [good] * 17},
    ]

    def round_of_bad_requests(n: int) -> None:
        with httpx.Client(base_url=small_body_server.url, timeout=30) as small:
            for i in range(n):
                response = client.post("/v1/caption", json=bodies[i % len(bodies)])
                assert 400 <= response.status_code < 500
                client.post("/v1/caption", content=b"{not json", headers={"Content-Type": "application/json"})
                small.post("/v1/caption", json={"images": [{"b64": "A" * 70_000}]})

    start = time.monotonic()
    round_of_bad_requests(60)  # warm up: allocator pools, caches, lazily built state
    before = rss_bytes()
    round_of_bad_requests(300)
    after = rss_bytes()
    assert time.monotonic() - start < 60
    assert after - before < 40 * 1024 * 1024, f"RSS grew by {(after - before) / 2**20:.1f} MiB"
    assert client.post("/v1/caption", json={"images": [good]}).status_code == 200
