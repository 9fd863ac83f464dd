"""http(s) manifest rows go through the server's safe fetcher (issue 14.9): loopback, `localhost` and a redirect to
loopback are refused before any connection, a server that drips bytes is cut off at the total time limit, and each
such row fails with its reason in errors.jsonl while the job goes on."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from jobs_helpers import read_errors, read_rows

import blip.jobs.sources as sources
from blip.fetch import FetchLimits, SyncFetcher, system_resolver
from blip.jobs import BatchConfig, TaskOptions, run_batch
from oracle import make_images, png_bytes

PUBLIC_HOST = "images.example.com"
PUBLIC_IP = "93.184.216.34"  # what PUBLIC_HOST "resolves" to here; nothing ever connects to it


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a fetcher hanging up early is expected
        pass


class LocalServer:
    """127.0.0.1: `/a.png` an image, `/drip` the headers and then one byte every `drip_s`. Counts requests."""

    def __init__(self, png: bytes, drip_s: float = 0.3):
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                if self.path != "/drip":
                    self.wfile.write(png)
                    return
                for i in range(len(png)):  # each byte well inside the read timeout: only a total limit stops it
                    self.wfile.write(png[i : i + 1])
                    self.wfile.flush()
                    time.sleep(drip_s)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def png() -> bytes:
    return png_bytes(make_images(1, seed=4)[0])


@pytest.fixture
def local_server(png):
    server = LocalServer(png)
    yield server
    server.close()


def _manifest(tmp_path, png: bytes, urls: dict[str, str]):
    (tmp_path / "good.png").write_bytes(png)
    lines = [{"id": "good", "image": "good.png"}] + [{"id": key, "image": url} for key, url in urls.items()]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _run(caption_model, manifest, out):
    options = TaskOptions(max_new_tokens=5)
    return run_batch(BatchConfig("caption", str(caption_model), str(manifest), str(out), workers=0, options=options))


def test_loopback_localhost_and_redirects_to_loopback_are_refused(
    caption_model, local_server, png, tmp_path, monkeypatch
):
    connected: list[str] = []

    def public_site(request: httpx.Request) -> httpx.Response:
        connected.append(str(request.url))
        assert request.url.host == PUBLIC_IP and request.headers["host"] == PUBLIC_HOST
        return httpx.Response(302, headers={"Location": f"http://127.0.0.1:{local_server.port}/a.png"})

    async def resolver(host: str, port: int) -> list[str]:
        return [PUBLIC_IP] if host == PUBLIC_HOST else await system_resolver(host, port)

    fetcher = SyncFetcher(
        FetchLimits(total_timeout_s=10.0), resolver=resolver, transport=httpx.MockTransport(public_site)
    )
    monkeypatch.setattr(sources, "_url_fetcher", fetcher)
    manifest = _manifest(
        tmp_path,
        png,
        {
            "loopback": f"http://127.0.0.1:{local_server.port}/a.png",
            "localhost": f"http://localhost:{local_server.port}/a.png",
            "redirect": f"http://{PUBLIC_HOST}/photo.png",
        },
    )
    try:
        result = _run(caption_model, manifest, tmp_path / "out")
    finally:
        fetcher.close()
    assert [row["image"] for row in read_rows(tmp_path / "out")] == ["good"]  # the job went on
    errors = {e["image"]: e["error"] for e in read_errors(tmp_path / "out")}
    assert set(errors) == {"loopback", "localhost", "redirect"} and result.summary.rows_failed == 3
    assert all("refused" in reason and "loopback" in reason for reason in errors.values()), errors
    assert "redirect 1" in errors["redirect"]
    assert local_server.requests == []  # nothing reached the local server
    assert connected == [f"http://{PUBLIC_IP}/photo.png"]  # only the public hop was made


def test_a_dripping_server_fails_its_row_at_the_total_time_limit(
    caption_model, local_server, png, tmp_path, monkeypatch
):
    limit = 1.5
    fetcher = SyncFetcher(FetchLimits(read_timeout_s=10.0, total_timeout_s=limit), allow_loopback=True)
    monkeypatch.setattr(sources, "_url_fetcher", fetcher)
    manifest = _manifest(tmp_path, png, {"drip": f"http://127.0.0.1:{local_server.port}/drip"})
    started = time.perf_counter()
    row = next(r for r in sources.plan_input(str(manifest), "caption").rows if r.id == "drip")
    with pytest.raises(sources.RowError, match=f"longer than {limit:g} s"):
        sources.read_image(row)
    assert time.perf_counter() - started < limit + 2.0
    try:
        _run(caption_model, manifest, tmp_path / "out")
    finally:
        fetcher.close()
    assert [row["image"] for row in read_rows(tmp_path / "out")] == ["good"]
    (error,) = read_errors(tmp_path / "out")
    assert error["image"] == "drip" and f"longer than {limit:g} s" in error["error"]


def test_the_default_job_fetcher_has_total_and_size_limits():
    fetcher = sources.url_fetcher()
    assert isinstance(fetcher, SyncFetcher) and not fetcher._options.get("allow_loopback")
    assert fetcher.limits.total_timeout_s == sources.URL_TIMEOUT_S and fetcher.limits.max_bytes == sources.URL_MAX_BYTES
