"""Slow and idle clients: uvicorn's h11 protocol with a request-head timeout and a cap on open connections.

uvicorn closes a keep-alive connection after `timeout_keep_alive` once a response is sent, but nothing else: a
connection that never sends a complete request head (connect and wait, or a byte every few seconds: slowloris) stays
open for good, and enough of them exhaust the open-file limit, after which the accept loop fails (and logs) on every
try. `guarded_protocol(...)` returns a subclass of uvicorn's `H11Protocol` (passed as `uvicorn.Config(http=...)`, the
documented way to choose the protocol class) that adds:

- a head timeout: from the moment a connection opens, and from the first byte of each later request, the request
  head must be complete within `header_timeout_s`, or the connection is closed;
- a cap on open connections: past `max_open`, a new connection first evicts the oldest connection that is waiting
  for a request head (idle keep-alive or slow), so a flood of half-open sockets cannot lock out real clients; when
  every connection is busy with a request, the new one is answered 503 and closed at once.

It relies only on the protocol's documented hooks (`connection_made`, `data_received`, `connection_lost`,
`on_response_complete`) and h11's public connection state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from blip.serve.errors import error_body

_logger = logging.getLogger(__name__)

FD_RESERVE = 64  # open files kept free for everything but client connections (models, logs, URL fetches, ...)
BUSY_BODY = error_body("overloaded", "too many open connections; retry later")
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: " + str(len(BUSY_BODY)).encode() + b"\r\n\r\n" + BUSY_BODY
)


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered if needed to stay under the open-file limit (raised to its hard maximum first), counting
    the files already open and `FD_RESERVE` for the rest of the server (each connection takes one file)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        opened = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 32
    except (OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    available = (soft - opened - FD_RESERVE) // 2  # half for client connections, half for the fetcher's sockets
    if available < wanted:
        message = "at most %d open connections (not %d): the open-file limit is %d (ulimit -n)"
        _logger.warning(message, max(available, 1), wanted, soft)
    return max(1, min(wanted, available))


class ConnectionGuard:
    """The state the connections of one server share: which ones wait for a request head, oldest first."""

    def __init__(self, header_timeout_s: float, max_open: int):
        self.header_timeout_s = header_timeout_s
        self.max_open = max_open
        self.waiting: dict[GuardedH11Protocol, None] = {}  # insertion-ordered: the oldest first


def guarded_protocol(header_timeout_s: float, max_open: int) -> type[GuardedH11Protocol]:
    """A protocol class for `uvicorn.Config(http=...)` with its own `ConnectionGuard`."""
    guard = ConnectionGuard(header_timeout_s, max_open)
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


class GuardedH11Protocol(H11Protocol):
    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.guard.max_open and not self._evict_one():
            self.connections.discard(self)
            transport.write(BUSY_RESPONSE)
            transport.close()
            return
        self._wait_for_head()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._wait_for_head()  # the first byte of a request after a keep-alive pause
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._head_received()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.guard.waiting[self] = None  # idle: uvicorn's keep-alive timer runs; may be evicted at the cap

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_received()
        super().connection_lost(exc)

    def _wait_for_head(self) -> None:
        self.guard.waiting[self] = None
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.guard.header_timeout_s, self._head_timeout)

    def _head_received(self) -> None:
        self.guard.waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            _logger.debug("closed a connection: no complete request head in %g s", self.guard.header_timeout_s)
            self._close()

    def _evict_one(self) -> bool:
        """Close the oldest connection waiting for a request head (not this one); False if there is none."""
        victim = next((c for c in self.guard.waiting if c is not self), None)
        if victim is None:
            return False
        victim._close()
        return True

    def _close(self) -> None:
        self._head_received()
        self.connections.discard(self)  # counted out now, not when the loop gets to connection_lost
        self.transport.close()
