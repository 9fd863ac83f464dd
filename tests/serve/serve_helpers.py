"""Helpers for the server tests: live servers on 127.0.0.1 (uvicorn in a thread, on a socket bound to a free port),
a local image server for the URL-fetch tests, and a transport that records every connection the fetcher attempts
(tests only ever send traffic to loopback)."""

from __future__ import annotations

import base64
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import uvicorn

from blip.serve import ServeSettings, create_app
from blip.serve.cli import uvicorn_config
from oracle import png_bytes  # noqa: F401 - the server tests import it from here


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class RecordingTransport(httpx.AsyncBaseTransport):
    """Wraps the real transport and records the URL (with the address actually connected to) of every request."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(retries=0)
        self.urls: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        host = request.url.host
        assert host in ("127.0.0.1", "::1"), f"a test tried to connect to {host}"  # the workplace rule, enforced
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a background thread, configured as `blip serve` configures it (the
    connection guard and timeouts of the app's settings)."""

    def __init__(self, app, graceful_s: int = 10):
        self.app = app
        self.sock = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )  # proto set: asyncio then sets TCP_NODELAY
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        settings = app.state.service.settings
        self.server = uvicorn.Server(uvicorn_config(app, settings, timeout_graceful_shutdown=graceful_s))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def guarded_server(models, token: str) -> LiveServer:
    """`models` behind `token`, with small text and pixel limits (the client libraries' tests); use as `with`."""
    settings = ServeSettings(token=token, max_text_chars=200, max_image_pixels=64 * 64, max_wait_ms=5.0)
    return LiveServer(create_app(models, settings))


class _QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a fetcher hanging up early is expected here
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ImageServer:
    """A local HTTP server with the pages the fetch tests need; counts the requests it gets."""

    def __init__(self, png: bytes):
        self.png = png
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlparse(self.path)
                query = parse_qs(url.query)
                outer.requests.append((url.path, self.headers.get("Host", "")))
                if url.path == "/image.png":
                    self._send(200, outer.png, {"Content-Type": "image/png"})
                elif url.path == "/as-html.png":  # an image name and type, HTML content
                    self._send(200, b"<!doctype html><html><body>hi</body></html>", {"Content-Type": "image/png"})
                elif url.path.startswith("/hops/"):
                    left = int(url.path.rsplit("/", 1)[1])
                    target = "/image.png" if left == 0 else f"/hops/{left - 1}"
                    self._send(302, headers={"Location": target})
                elif url.path == "/to":
                    self._send(302, headers={"Location": query["url"][0]})
                elif url.path == "/slow":
                    time.sleep(min(float(query.get("s", ["2"])[0]), 3.0))
                    self._send(200, outer.png, {"Content-Type": "image/png"})
                elif url.path == "/trickle":  # headers at once, then a byte every 0.2 s
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(outer.png)))
                    self.end_headers()
                    for i in range(min(len(outer.png), 25)):
                        self.wfile.write(outer.png[i : i + 1])
                        self.wfile.flush()
                        time.sleep(0.2)
                elif url.path == "/big":
                    self._send(200, outer.png + b"\0" * (1024 * 1024), {"Content-Type": "image/png"})
                elif url.path == "/big-chunked":  # no Content-Length: the size shows only while streaming
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for _ in range(64):
                        chunk = outer.png[:16] + b"\0" * (16 * 1024)
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self._send(404, b"not found")

        self.httpd = _QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def artifacts_dir() -> Path | None:
    """runs/artifacts/ at the repository root, if it exists (test artifacts are copied there)."""
    folder = Path(__file__).resolve().parents[2] / "runs" / "artifacts"
    return folder if folder.is_dir() else None


def rss_bytes() -> int | None:
    """This process's resident set size (Linux), or None where /proc is not there."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
    except OSError:
        return None
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


def wait_until(condition, timeout: float = 10.0) -> None:
    """Polls `condition()` until it holds; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`blip serve` in a subprocess on 127.0.0.1 (its log in a file, so a long run never blocks on a full pipe);
    `status()` reads its memory from /proc."""

    def __init__(
        self, args: list[str], log_path: Path, env: dict[str, str] | None = None, max_open_files: int | None = None
    ):
        """`max_open_files`: the server's open-file limit (soft and hard), as a tight `ulimit -n` would set."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # closed in stop()
        command = [sys.executable, "-m", "blip.serve.cli", *args, "--port", str(self.port)]
        environ = {**os.environ, **(env or {})}
        limit = None
        if max_open_files is not None:
            import resource

            def limit() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=self._log, env=environ, preexec_fn=limit
        )

    def wait_ready(self, timeout: float = 120) -> ServeProcess:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as c:
            while True:
                assert self.proc.poll() is None, self.log()
                try:
                    if c.get("/readyz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not get ready"
                time.sleep(0.1)

    def status(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the server process, in bytes."""
        values = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) * 1024
        return values

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def png_variant(png: bytes, i: int) -> bytes:
    """`png` with a tEXt chunk after its header: other bytes (the server decodes each), the same pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    end_of_header = 8 + 25  # signature + IHDR chunk
    return png[:end_of_header] + chunk(b"tEXt", b"variant\0" + str(i).encode()) + png[end_of_header:]
