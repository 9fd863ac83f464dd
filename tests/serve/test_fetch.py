"""The safe URL fetcher on its own: address checks, refusals before any connection, redirects, limits, sniffing.

Only loopback is ever connected to: private and public addresses are refused before connecting, which the tests
prove with a resolver and a transport that record (or forbid) every call."""

from __future__ import annotations

import asyncio
import ipaddress

import httpx
import pytest
from serve_helpers import RecordingTransport

from blip.fetch import (
    FetchError,
    FetchLimits,
    SafeFetcher,
    UnsafeURLError,
    address_refusal,
    sniff_image_type,
)


class ForbiddenTransport(httpx.AsyncBaseTransport):
    """Fails the test if the fetcher ever tries to connect anywhere."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(str(request.url))
        raise AssertionError(f"the fetcher tried to connect to {request.url}")


class FakeResolver:
    """Maps names to fixed addresses and records the look-ups; no DNS is ever asked."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise OSError(f"unknown host {host}")
        return self.table[host]


def fetch(fetcher: SafeFetcher, url: str) -> bytes:
    async def go() -> bytes:
        try:
            return await fetcher.fetch(url, name="url")
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize(
    "address, kind",
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-global"),
        ("224.0.0.251", "multicast"),
        ("240.0.0.1", "private"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::", "loopback"),  # 6to4 carrying 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 carrying 10.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address, kind):
    reason = address_refusal(ipaddress.ip_address(address))
    assert reason is not None and kind in reason


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert address_refusal(ipaddress.ip_address(address)) is None


def test_loopback_only_with_the_opt_in():
    for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        ip = ipaddress.ip_address(address)
        assert address_refusal(ip) is not None
        assert address_refusal(ip, allow_loopback=True) is None
    assert address_refusal(ipaddress.ip_address("10.0.0.1"), allow_loopback=True) is not None


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://127.0.0.1/a.png", "loopback"),
        ("http://10.0.0.1/a.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]:8080/a.png", "loopback"),
        ("http://[::ffff:127.0.0.1]/a.png", "loopback"),
        ("http://[::ffff:a00:1]/a.png", "private"),
        ("https://192.168.0.1/a.png", "private"),
        ("http://0.0.0.0/", "unspecified"),
        ("file:///etc/passwd", "only http and https"),
        ("data:image/png;base64,iVBORw0KGgo=", "only http and https"),
        ("ftp://example.com/a.png", "only http and https"),
        ("gopher://example.com/", "only http and https"),
        ("/relative/path.png", "only http and https"),
        ("http://user:secret@example.com/a.png", "credentials"),
    ],
)
def test_refused_before_any_connection(url, words):
    transport, resolver = ForbiddenTransport(), FakeResolver({})
    with pytest.raises(UnsafeURLError, match=words):
        fetch(SafeFetcher(transport=transport, resolver=resolver), url)
    assert transport.calls == []
    assert resolver.calls == []  # literal addresses and bad schemes need no look-up


@pytest.mark.parametrize("address", ["10.0.0.1", "169.254.169.254", "::1", "::ffff:127.0.0.1", "fd00::5"])
def test_a_name_resolving_to_a_private_address_is_refused(address):
    transport, resolver = ForbiddenTransport(), FakeResolver({"internal.example": [address]})
    with pytest.raises(UnsafeURLError, match="internal.example"):
        fetch(SafeFetcher(transport=transport, resolver=resolver), "https://internal.example/cat.png")
    assert resolver.calls == ["internal.example"]
    assert transport.calls == []


def test_one_bad_address_among_good_ones_refuses():
    resolver = FakeResolver({"mixed.example": ["93.184.216.34", "10.1.2.3"]})
    transport = ForbiddenTransport()
    with pytest.raises(UnsafeURLError, match="10.1.2.3"):
        fetch(SafeFetcher(transport=transport, resolver=resolver), "http://mixed.example/a.png")
    assert transport.calls == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "127.1", "localhost"])
def test_numeric_and_named_spellings_of_loopback_are_refused(host):
    """inet_aton spellings and `localhost` go through the system resolver and are checked like any answer."""
    transport = ForbiddenTransport()
    with pytest.raises(UnsafeURLError, match="loopback"):
        fetch(SafeFetcher(transport=transport), f"http://{host}/a.png")
    assert transport.calls == []


def test_connects_to_the_checked_address_keeping_the_name(image_server, images):
    """The resolved (checked) address is what the connection goes to, and Host still names the site: a second,
    different DNS answer (rebinding) cannot redirect the connection."""
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])  # a rebinding resolver: harmless first, private second

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    transport = RecordingTransport()
    fetcher = SafeFetcher(allow_loopback=True, resolver=rebinding, transport=transport)
    data = fetch(fetcher, f"http://images.example:{image_server.port}/image.png")
    assert sniff_image_type(data) == "png"
    assert transport.urls == [f"http://127.0.0.1:{image_server.port}/image.png"]
    assert image_server.requests[-1] == ("/image.png", f"images.example:{image_server.port}")


def test_default_fetcher_refuses_the_local_test_server(image_server):
    transport = ForbiddenTransport()
    with pytest.raises(UnsafeURLError, match="loopback"):
        fetch(SafeFetcher(transport=transport), f"{image_server.url}/image.png")
    assert transport.calls == []


def test_redirects_are_followed_and_rechecked(image_server):
    transport = RecordingTransport()
    fetcher = SafeFetcher(FetchLimits(max_redirects=3), allow_loopback=True, transport=transport)
    assert sniff_image_type(fetch(fetcher, f"{image_server.url}/hops/2")) == "png"
    assert len(transport.urls) == 4


def test_too_many_redirects(image_server):
    transport = RecordingTransport()
    fetcher = SafeFetcher(FetchLimits(max_redirects=2), allow_loopback=True, transport=transport)
    with pytest.raises(FetchError, match="more than 2 redirects") as info:
        fetch(fetcher, f"{image_server.url}/hops/5")
    assert info.value.code == "too_many_redirects"
    assert len(transport.urls) == 3


@pytest.mark.parametrize(
    "target, words",
    [
        ("http://10.0.0.1/a.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::ffff:10.0.0.7]/", "private"),
        ("file:///etc/passwd", "only http and https"),
    ],
)
def test_redirect_to_a_private_address_is_refused_before_connecting(image_server, target, words):
    transport = RecordingTransport()  # asserts every connection goes to loopback
    fetcher = SafeFetcher(allow_loopback=True, transport=transport)
    with pytest.raises(UnsafeURLError, match=words) as info:
        fetch(fetcher, f"{image_server.url}/to?url={target}")
    assert "redirect 1" in str(info.value)
    assert transport.urls == [f"{image_server.url}/to?url={target}"]


def test_redirect_to_a_name_resolving_privately_is_refused(image_server):
    resolver = FakeResolver({"cdn.example": ["127.0.0.1"], "metadata.example": ["169.254.169.254"]})
    transport = RecordingTransport()
    fetcher = SafeFetcher(allow_loopback=True, resolver=resolver, transport=transport)
    with pytest.raises(UnsafeURLError, match="metadata.example"):
        fetch(fetcher, f"http://cdn.example:{image_server.port}/to?url=http://metadata.example/x")
    assert resolver.calls == ["cdn.example", "metadata.example"]
    assert len(transport.urls) == 1


def test_slow_server_times_out(image_server):
    fetcher = SafeFetcher(FetchLimits(read_timeout_s=0.3, total_timeout_s=5), allow_loopback=True)
    with pytest.raises(FetchError, match="timed out") as info:
        fetch(fetcher, f"{image_server.url}/slow?s=2")
    assert info.value.code == "fetch_timeout"


def test_trickling_server_hits_the_total_deadline(image_server):
    """Each byte arrives within the read timeout; the total deadline still ends it."""
    fetcher = SafeFetcher(FetchLimits(read_timeout_s=1.0, total_timeout_s=0.8), allow_loopback=True)
    with pytest.raises(FetchError, match="longer than 0.8 s"):
        fetch(fetcher, f"{image_server.url}/trickle")


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
def test_body_over_the_byte_limit(image_server, path):
    fetcher = SafeFetcher(FetchLimits(max_bytes=64 * 1024), allow_loopback=True)
    with pytest.raises(FetchError, match="over the limit") as info:
        fetch(fetcher, f"{image_server.url}{path}")
    assert info.value.status == 413


def test_content_is_sniffed_not_trusted_from_headers(image_server):
    fetcher = SafeFetcher(allow_loopback=True)
    with pytest.raises(FetchError, match="did not return an image \\(HTML\\)"):
        fetch(fetcher, f"{image_server.url}/as-html.png")


def test_http_errors_are_reported(image_server):
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(SafeFetcher(allow_loopback=True), f"{image_server.url}/missing")


def test_unresolvable_name():
    resolver = FakeResolver({})
    with pytest.raises(FetchError, match="cannot resolve"):
        fetch(SafeFetcher(resolver=resolver, transport=ForbiddenTransport()), "http://nowhere.example/a.png")


def test_sniffing():
    assert sniff_image_type(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_image_type(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_image_type(b"GIF89a") == "gif"
    assert sniff_image_type(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert sniff_image_type(b"<html>") is None
    assert sniff_image_type(b"%!PS-Adobe-3.0 EPSF") is None  # formats that run interpreters are not accepted


def test_sync_fetcher_runs_the_same_checks_for_blocking_threads(image_server):
    """`SyncFetcher` (the batch jobs' entry point) is the async fetcher on a private loop: the same refusals, and
    several threads fetch at once through it."""
    from concurrent.futures import ThreadPoolExecutor

    from blip.fetch import SyncFetcher

    refusing = SyncFetcher(transport=ForbiddenTransport())
    with pytest.raises(UnsafeURLError, match="loopback"):
        refusing.fetch(f"{image_server.url}/image.png")
    refusing.close()
    fetcher = SyncFetcher(FetchLimits(total_timeout_s=5.0), allow_loopback=True)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(fetcher.fetch, [f"{image_server.url}/image.png"] * 8))
        assert all(sniff_image_type(data) == "png" for data in results)
        with pytest.raises(FetchError, match="HTTP 404"):
            fetcher.fetch(f"{image_server.url}/missing", name="row 3")
        fetcher.close()  # a later fetch starts the loop again
        assert sniff_image_type(fetcher.fetch(f"{image_server.url}/image.png")) == "png"
    finally:
        fetcher.close()
    slow = SyncFetcher(FetchLimits(total_timeout_s=0.5), allow_loopback=True)
    with pytest.raises(FetchError, match="longer than 0.5 s"):
        slow.fetch(f"{image_server.url}/trickle")
    slow.close()
