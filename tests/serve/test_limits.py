"""The server's limits as units: the JSON shape check, the in-flight pixel budget, bounded metric labels, and the
log filter that drops repeated lines."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from blip.serve.cli import RepeatFilter
from blip.serve.inputs import PixelBudget
from blip.serve.metrics import ServerMetrics
from blip.serve.middleware import JsonTooComplex, check_json_shape, method_label, parse_json


def test_json_shape_check():
    ordinary = json.dumps({"images": [{"b64": "A" * 100_000}], "questions": [["what, [really] {is} it?"] * 50]})
    check_json_shape(ordinary.encode(), max_depth=8, max_items=200)
    strings = json.dumps({"texts": [",[{" * 10_000, 'say "[" \\ or ",,"']}).encode()  # structure inside strings
    check_json_shape(strings, max_depth=4, max_items=10)
    with pytest.raises(JsonTooComplex, match="more than 10 values"):
        check_json_shape(json.dumps(list(range(11))).encode(), max_depth=4, max_items=10)
    with pytest.raises(JsonTooComplex, match="deeper than 4 levels"):
        check_json_shape(b'{"a": [[[[1]]]]}', max_depth=4, max_items=100)
    check_json_shape(b'{"a": [[[1]]]}', max_depth=4, max_items=100)
    check_json_shape(b'["unterminated', max_depth=1, max_items=1)  # left to the parser
    with pytest.raises(ValueError):
        parse_json(b"{not json", max_depth=4, max_items=10)
    assert parse_json(b'{"a": [1, "x,y"]}', max_depth=4, max_items=10) == {"a": [1, "x,y"]}
    assert parse_json('\ufeff{"a": "日本, [語]"}'.encode(), max_depth=4, max_items=10) == {"a": "日本, [語]"}
    hidden = ('{"a": "\u2200", "b": ' + "[1," * 50 + "1" + "]" * 50 + "}").encode("utf-16-le")
    with pytest.raises(ValueError):  # read as UTF-8 only: in UTF-16 a 0x22 byte need not be a quote
        parse_json(hidden, max_depth=64, max_items=1000)
    with pytest.raises(ValueError, match="not UTF-8"):
        parse_json(b'{"a": "\xff"}', max_depth=4, max_items=10)


def test_json_shape_check_stops_early_on_a_bomb():
    """14.5's body: 31 MB of `[],[],...` is refused after a scan of the first max_items values (json.loads took
    seconds and hundreds of MB on it)."""
    bomb = b"[" + b"[]," * 10_000_000 + b"[]]"
    start = time.perf_counter()
    with pytest.raises(JsonTooComplex, match="more than 10000 values"):
        check_json_shape(bomb, max_depth=32, max_items=10_000)
    assert time.perf_counter() - start < 1.0


def test_pixel_budget_is_first_come_first_served():
    async def scenario() -> list[str]:
        budget = PixelBudget(100)
        order: list[str] = []
        await budget.acquire(60)

        async def take(name: str, pixels: int) -> None:
            await budget.acquire(pixels)
            order.append(name)

        big = asyncio.create_task(take("big", 80))
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 10))  # would fit now, but waits behind "big"
        await asyncio.sleep(0.01)
        assert order == [] and budget.waiting == 2
        gone = asyncio.create_task(take("cancelled", 5))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        budget.release(60)
        await asyncio.gather(big, small)
        assert budget.used == 90 and budget.waiting == 0
        with pytest.raises(ValueError):
            await budget.acquire(101)
        return order

    assert asyncio.run(scenario()) == ["big", "small"]


def test_a_waiter_cancelled_while_the_budget_is_released_leaves_cleanly():
    """Cancelled, then dropped by the release's wake-up before its task runs: the task ends cancelled (not with a
    ValueError from removing an entry that is gone) and the budget stays consistent."""

    async def scenario() -> None:
        budget = PixelBudget(10)
        await budget.acquire(10)
        task = asyncio.create_task(budget.acquire(5))
        await asyncio.sleep(0)  # the task now waits
        task.cancel()  # its future is cancelled at once, its except-branch runs later
        budget.release(10)  # the wake-up drops the cancelled entry first
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.used == 0 and budget.waiting == 0
        await budget.acquire(10)

    asyncio.run(scenario())


def test_unknown_methods_are_one_label():
    metrics = ServerMetrics()
    for method in ("GET", "POST", "X" * 5000, "BREW", "get"):
        metrics.requests.inc(route="unmatched", method=method_label(method), status="405")
    text = metrics.render()
    assert 'method="OTHER",status="405"} 3' in text and "XXXX" not in text and len(text) < 2000


def test_repeated_log_lines_are_dropped_and_counted():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("blip.test.repeat")
    handler = Keep()
    handler.addFilter(RepeatFilter(burst=3, window_s=0.3))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(100):
            logger.error("socket.accept() out of system resource (%d)", i)
        logger.error("another message")
        assert len(records) == 4
        time.sleep(0.35)
        logger.error("socket.accept() out of system resource (%d)", 100)
        assert "97 more like this dropped" in records[-1].getMessage()
    finally:
        logger.removeHandler(handler)
