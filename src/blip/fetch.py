"""The one safe way to fetch an image from a URL someone else gave us: a client of `blip serve`, or a row of a batch
job's manifest (`blip batch`, CapFilt).

- http and https only; no credentials in the URL.
- The host is resolved here and every resolved address is checked: loopback, private, link-local, multicast,
  reserved, unspecified and other non-global ranges are refused, IPv4 and IPv6 alike, including IPv4 addresses
  carried inside IPv6 ones (IPv4-mapped, 6to4, Teredo, NAT64). The connection then goes to the checked address (the
  URL is rewritten to it; Host header and TLS SNI keep the name), so a second DNS answer cannot move it elsewhere.
- Redirects are followed by hand, at most `max_redirects`, and each hop is resolved and checked again.
- Connect, read and total time limits; the body is streamed and abandoned past `max_bytes`.
- The content is sniffed (magic bytes) and must be an image format we accept; Content-Type is not trusted.

`SafeFetcher` is async (the server's event loop); `SyncFetcher` runs the same fetcher on a private event loop in a
daemon thread for callers that block (the batch jobs' prefetch threads), so there is one implementation of the checks.

`allow_loopback=True` is for tests only: it lets a local HTTP server on 127.0.0.1 / ::1 stand in for the internet.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

_logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

REDIRECT_CODES = {301, 302, 303, 307, 308}
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
SNIFF_BYTES = 16
USER_AGENT = "blip/0.1 (image fetcher)"


class FetchError(Exception):
    """The URL could not be fetched as an image. `status` is the HTTP status the server should answer with."""

    code = "fetch_failed"

    def __init__(self, message: str, *, status: int = 422, code: str | None = None):
        super().__init__(message)
        self.status = status
        if code is not None:
            self.code = code


class UnsafeURLError(FetchError):
    """The URL (or a redirect) points somewhere we refuse to connect to. Raised before any connection is made."""

    code = "url_refused"


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 16 * 1024 * 1024
    max_redirects: int = 3
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 20.0


def sniff_image_type(data: bytes) -> str | None:
    """The image format the first bytes announce (png, jpeg, gif, webp, bmp, tiff), or None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


def describe_content(data: bytes) -> str:
    """A short human hint of what non-image bytes look like, for error messages."""
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if head.startswith((b"{", b"[")):
        return "JSON or text"
    if head.startswith(b"<"):
        return "XML or HTML"
    if head.startswith(b"%pdf"):
        return "PDF"
    return "not a known image format"


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (IPv4-mapped, 6to4, Teredo client, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _range_name(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address ("private", "loopback", ...), or None if it is one."""
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if not ip.is_global:
        return "non-global"
    return None


def address_refusal(ip: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """None if we may connect to `ip`; otherwise why not (e.g. "a private address")."""
    inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    if inner is not None:
        reason = address_refusal(inner, allow_loopback=allow_loopback)
        if reason is not None:
            return f"an IPv6 address carrying {inner}, {reason}"
        if ip.ipv4_mapped is not None:
            return None
    if allow_loopback and ip.is_loopback:
        return None
    kind = _range_name(ip)
    if kind is None:
        return None
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address"


async def system_resolver(host: str, port: int) -> list[str]:
    """All addresses the system resolver gives for `host` (TCP)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class _Target:
    url: httpx.URL  # the URL as given (for Host, SNI and resolving redirects)
    host: str  # ASCII (IDNA) host without brackets
    port: int
    ip: IPAddress  # the checked address we connect to


class SafeFetcher:
    """Fetch image bytes from http(s) URLs without letting a client reach internal addresses."""

    def __init__(
        self,
        limits: FetchLimits | None = None,
        *,
        allow_loopback: bool = False,
        resolver: Resolver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.limits = limits or FetchLimits()
        self.allow_loopback = allow_loopback
        self.resolver = resolver or system_resolver
        timeout = httpx.Timeout(
            connect=self.limits.connect_timeout_s,
            read=self.limits.read_timeout_s,
            write=self.limits.read_timeout_s,
            pool=self.limits.connect_timeout_s,
        )
        self._client = httpx.AsyncClient(
            transport=transport or httpx.AsyncHTTPTransport(retries=0),
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,  # a proxy from the environment would connect for us, past our checks
            headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, *, name: str = "url") -> bytes:
        """The image bytes at `url`. Raises UnsafeURLError (before connecting) or FetchError, naming `name`."""
        try:
            return await asyncio.wait_for(self._fetch(url, name), self.limits.total_timeout_s)
        except asyncio.TimeoutError as e:
            raise FetchError(
                f"{name}: fetching took longer than {self.limits.total_timeout_s:g} s", code="fetch_timeout"
            ) from e

    async def check(self, url: str, *, name: str = "url") -> _Target:
        """Parse, resolve and check `url` without connecting. Raises UnsafeURLError."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as e:
            raise UnsafeURLError(f"{name}: not a valid URL ({e})") from e
        scheme = parsed.scheme.lower()
        if scheme not in ("http", "https"):
            shown = f"{scheme}:" if scheme else "a relative URL"
            raise UnsafeURLError(f"{name}: only http and https URLs are fetched, not {shown}")
        if parsed.userinfo:
            raise UnsafeURLError(f"{name}: URLs with credentials (user:password@) are not accepted")
        try:
            host = parsed.raw_host.decode("ascii").strip("[]").rstrip(".")
        except UnicodeDecodeError as e:
            raise UnsafeURLError(f"{name}: host is not valid") from e
        if not host:
            raise UnsafeURLError(f"{name}: URL has no host")
        port = parsed.port or (443 if scheme == "https" else 80)
        addresses = await self._addresses(host, port, name)
        for ip in addresses:
            reason = address_refusal(ip, allow_loopback=self.allow_loopback)
            if reason is not None:
                shown = host if str(ip) == host else f"{host} ({ip})"
                raise UnsafeURLError(f"{name}: refused to connect to {shown}: {reason}")
        return _Target(parsed, host, port, addresses[0])

    async def _addresses(self, host: str, port: int, name: str) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            found = await self.resolver(host, port)
        except (OSError, UnicodeError) as e:
            raise FetchError(f"{name}: cannot resolve host {host!r} ({e})", code="fetch_failed") from e
        addresses = []
        for text in found:
            try:
                addresses.append(ipaddress.ip_address(text.split("%", 1)[0]))
            except ValueError as e:
                raise UnsafeURLError(f"{name}: {host!r} resolved to something that is not an address") from e
        if not addresses:
            raise FetchError(f"{name}: host {host!r} has no address")
        return addresses

    async def _fetch(self, url: str, name: str) -> bytes:
        current = url
        for hop in range(self.limits.max_redirects + 1):
            target = await self.check(current, name=name if hop == 0 else f"{name} (redirect {hop})")
            request = self._request(target)
            try:
                response = await self._client.send(request, stream=True)
            except httpx.TimeoutException as e:
                raise FetchError(f"{name}: {target.host} timed out ({type(e).__name__})", code="fetch_timeout") from e
            except httpx.HTTPError as e:
                raise FetchError(f"{name}: cannot fetch from {target.host} ({type(e).__name__}: {e})") from e
            try:
                if response.status_code in REDIRECT_CODES:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError(f"{name}: redirect ({response.status_code}) without a Location")
                    current = str(target.url.join(location))
                    continue
                if response.status_code != 200:
                    raise FetchError(f"{name}: the server answered HTTP {response.status_code}")
                return await self._read(response, name, target.host)
            finally:
                await response.aclose()
        raise FetchError(f"{name}: more than {self.limits.max_redirects} redirects", code="too_many_redirects")

    def _request(self, target: _Target) -> httpx.Request:
        default_port = 443 if target.url.scheme == "https" else 80
        host_header = f"[{target.host}]" if ":" in target.host else target.host
        if target.port != default_port:
            host_header += f":{target.port}"
        url = target.url.copy_with(host=str(target.ip), port=target.port, fragment=None)
        extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
        return self._client.build_request("GET", url, headers={"Host": host_header}, extensions=extensions)

    async def _read(self, response: httpx.Response, name: str, host: str) -> bytes:
        limit = self.limits.max_bytes
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchError(f"{name}: compressed responses ({encoding}) are not accepted", code="invalid_image")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise FetchError(
                f"{name}: the image is {int(declared)} bytes, over the limit of {limit}", status=413, code="too_large"
            )
        chunks: list[bytes] = []
        size = 0
        sniffed = False
        try:
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > limit:
                    raise FetchError(
                        f"{name}: the image is over the limit of {limit} bytes", status=413, code="too_large"
                    )
                chunks.append(chunk)
                if not sniffed and size >= SNIFF_BYTES:
                    self._sniff(b"".join(chunks), name)
                    sniffed = True
        except httpx.TimeoutException as e:
            raise FetchError(f"{name}: {host} timed out while sending the image", code="fetch_timeout") from e
        except httpx.HTTPError as e:
            raise FetchError(f"{name}: the transfer from {host} failed ({type(e).__name__})") from e
        data = b"".join(chunks)
        if not data:
            raise FetchError(f"{name}: the server sent an empty body", code="invalid_image")
        self._sniff(data, name)
        return data

    @staticmethod
    def _sniff(data: bytes, name: str) -> None:
        if sniff_image_type(data) is None:
            message = f"{name}: the URL did not return an image ({describe_content(data)})"
            raise FetchError(message, code="invalid_image")


class SyncFetcher:
    """`SafeFetcher` for blocking callers, e.g. worker threads: `fetch(url)` returns the bytes or raises FetchError,
    within the total time limit. Thread-safe; concurrent calls share one event loop (a daemon thread, started on first
    use and again in a forked child) and one connection pool. `options` are SafeFetcher's (allow_loopback,
    resolver, transport)."""

    def __init__(self, limits: FetchLimits | None = None, **options: Any):
        self.limits = limits or FetchLimits()
        self._options = options
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._fetcher: SafeFetcher | None = None

    def _started(self) -> tuple[asyncio.AbstractEventLoop, SafeFetcher]:
        with self._lock:
            if self._pid != os.getpid() or self._loop is None or self._fetcher is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="blip-fetch", daemon=True)
                thread.start()
                self._pid, self._loop, self._thread = os.getpid(), loop, thread
                self._fetcher = SafeFetcher(self.limits, **self._options)
            return self._loop, self._fetcher

    def fetch(self, url: str, *, name: str = "url") -> bytes:
        """The image bytes at `url`. Raises UnsafeURLError (before connecting) or FetchError, naming `name`."""
        loop, fetcher = self._started()
        future = asyncio.run_coroutine_threadsafe(fetcher.fetch(url, name=name), loop)
        try:  # the coroutine enforces the total limit itself; this bound only guards against a stuck loop
            return future.result(timeout=self.limits.total_timeout_s + 5.0)
        except concurrent.futures.TimeoutError as e:
            future.cancel()
            raise FetchError(
                f"{name}: fetching took longer than {self.limits.total_timeout_s:g} s", code="fetch_timeout"
            ) from e

    def close(self) -> None:
        """Close the connections and stop the loop thread (a later `fetch` starts them again)."""
        with self._lock:
            loop, thread, fetcher, pid = self._loop, self._thread, self._fetcher, self._pid
            self._loop = self._thread = self._fetcher = self._pid = None
        if loop is None or pid != os.getpid():
            return
        if fetcher is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(fetcher.aclose(), loop).result(timeout=5.0)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5.0)
        if not loop.is_running():
            loop.close()
