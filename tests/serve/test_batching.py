"""The micro-batcher and the merged task calls: requests merge, limits hold, failures stay with their request, and
merged results equal the Python API's results for each request alone."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import pytest
import torch
from serve_helpers import png_bytes

from blip.serve.batching import BatcherClosed, MicroBatcher, QueueFull
from blip.tasks.batch import CaptionWork, ImageItem, PairWork, SimilarityWork, dispatch
from blip.tasks.options import CaptionOptions, VqaOptions


class Recorder:
    """A runner that records its batches; `gate` (if set) holds each batch until released."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[tuple[object, list[object]]] = []
        self.gate = gate

    def __call__(self, key, payloads):
        if self.gate is not None:
            assert self.gate.wait(10)
        self.batches.append((key, list(payloads)))
        return [(key, p) for p in payloads]


def run_async(coro):
    return asyncio.run(coro)


def test_concurrent_jobs_with_one_key_share_a_call():
    runner = Recorder()
    batcher = MicroBatcher(runner, max_batch=8, max_wait_ms=200, queue_size=16)
    batcher.start()

    async def go():
        return await asyncio.gather(*(batcher.submit("k", i, 1) for i in range(6)))

    try:
        results = run_async(go())
    finally:
        batcher.close(5)
    assert results == [("k", i) for i in range(6)]
    assert [len(p) for _, p in runner.batches] == [6]


def test_max_batch_rows_and_keys_are_respected():
    gate = threading.Event()
    runner = Recorder(gate)
    batcher = MicroBatcher(runner, max_batch=4, max_wait_ms=50, queue_size=32)
    batcher.start()

    async def go():
        jobs = [batcher.submit("a", i, 1) for i in range(6)]
        jobs += [batcher.submit("b", 10, 3), batcher.submit("big", 20, 9)]  # a job over max_batch runs alone
        tasks = [asyncio.ensure_future(j) for j in jobs]
        await asyncio.sleep(0.1)
        gate.set()
        return await asyncio.gather(*tasks)

    try:
        run_async(go())
    finally:
        batcher.close(5)
    by_key: dict[str, list[int]] = {}
    for key, payloads in runner.batches:
        by_key.setdefault(key, []).append(len(payloads))
    assert by_key["b"] == [1] and by_key["big"] == [1]
    assert sum(by_key["a"]) == 6 and max(by_key["a"]) <= 4


def test_admission_is_bounded():
    batcher = MicroBatcher(Recorder(), queue_size=2)
    batcher.start()
    try:
        first, second = batcher.admit(), batcher.admit()
        with pytest.raises(QueueFull):
            batcher.admit()
        first.release()
        first.release()  # releasing twice is harmless
        third = batcher.admit()
        assert batcher.admitted == 2
        second.release()
        third.release()
        assert batcher.admitted == 0
    finally:
        batcher.close(5)
    with pytest.raises(BatcherClosed):
        batcher.admit()


def test_a_failing_job_does_not_fail_its_neighbours():
    def runner(key, payloads):
        if "bad" in payloads:
            raise ValueError("bad input")
        return [p.upper() for p in payloads]

    batcher = MicroBatcher(runner, max_batch=8, max_wait_ms=100)
    batcher.start()

    async def go():
        return await asyncio.gather(*(batcher.submit("k", p, 1) for p in ["x", "bad", "y"]), return_exceptions=True)

    try:
        results = run_async(go())
    finally:
        batcher.close(5)
    assert results[0] == "X" and results[2] == "Y"
    assert isinstance(results[1], ValueError)


def test_a_job_whose_caller_gave_up_is_dropped():
    gate = threading.Event()
    runner = Recorder(gate)
    batcher = MicroBatcher(runner, max_batch=1, max_wait_ms=0)
    batcher.start()

    async def go():
        blocker = asyncio.ensure_future(batcher.submit("k", "first", 1))
        await asyncio.sleep(0.05)  # "first" is running (held at the gate)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit("k", "abandoned", 1), 0.05)
        gate.set()
        return await blocker

    try:
        assert run_async(go()) == ("k", "first")
    finally:
        batcher.close(5)
    assert [p for _, payloads in runner.batches for p in payloads] == ["first"]


def test_close_finishes_queued_work():
    runner = Recorder()
    batcher = MicroBatcher(runner, max_batch=2, max_wait_ms=0)
    batcher.start()
    loop = asyncio.new_event_loop()
    try:
        futures = [loop.create_task(batcher.submit("k", i, 1)) for i in range(5)]
        loop.run_until_complete(asyncio.sleep(0))  # queue them
        closer = threading.Thread(target=batcher.close, args=(5,))
        closer.start()
        results = loop.run_until_complete(asyncio.gather(*futures))
        closer.join(5)
    finally:
        loop.close()
    assert results == [("k", i) for i in range(5)]
    assert not batcher.running


def test_waits_at_most_max_wait():
    batcher = MicroBatcher(Recorder(), max_batch=64, max_wait_ms=30)
    batcher.start()
    try:
        start = time.perf_counter()
        run_async(batcher.submit("k", 1, 1))
        assert time.perf_counter() - start < 1.0
    finally:
        batcher.close(5)


def _item(image) -> ImageItem:
    return ImageItem(hashlib.sha256(png_bytes(image)).hexdigest(), image)


def test_merged_captions_equal_each_request_alone(tiny_models, images):
    blip = tiny_models["captioner"]
    for options in [CaptionOptions(), CaptionOptions(num_beams=3, prompt="a picture of")]:
        works = [CaptionWork([_item(images[0]), _item(images[1])]), CaptionWork([_item(images[1])])]
        works.append(CaptionWork([_item(images[2]), _item(images[0])]))
        merged = dispatch(blip, "caption", options, works)
        for work, result in zip(works, merged):
            alone = blip.caption([i.image for i in work.images], prompt=options.prompt, num_beams=options.num_beams)
            assert [c[0].token_ids for c in result] == [c.token_ids for c in alone]
            assert [c[0].score for c in result] == pytest.approx([c.score for c in alone], abs=1e-4)


def test_merged_answers_and_scores_equal_each_request_alone(tiny_models, images):
    vqa, retrieval = tiny_models["vqa"], tiny_models["retrieval"]
    questions = [["what is it?", "how many dogs?"], ["where is the star?"]]
    works = [PairWork([_item(images[0])], questions[0], [0, 0]), PairWork([_item(images[1])], questions[1], [0])]
    merged = dispatch(vqa, "vqa", VqaOptions(max_new_tokens=10), works)
    for image, qs, result in zip(images, questions, merged):
        alone = vqa.answer(image, qs)
        assert [a.token_ids for a in result] == [a.token_ids for a in alone]

    texts = ["a red circle", "two dogs on the beach"]
    works = [PairWork([_item(images[0])], texts, [0, 0]), PairWork([_item(images[2]), _item(images[0])], texts, [0, 1])]
    merged = dispatch(retrieval, "match", None, works)
    assert merged[0] == pytest.approx(retrieval.match(images[0], texts), abs=1e-5)
    assert merged[1] == pytest.approx(retrieval.match([images[2], images[0]], texts), abs=1e-5)

    works = [SimilarityWork([_item(images[0]), _item(images[1])], texts), SimilarityWork([_item(images[1])], texts[:1])]
    merged = dispatch(retrieval, "similarity", None, works)
    expected = retrieval.similarity(images[:2], texts)
    assert torch.tensor(merged[0]) == pytest.approx(expected, abs=1e-5)
    assert merged[1][0][0] == pytest.approx(float(expected[1, 0]), abs=1e-5)


def test_an_image_shared_by_requests_in_a_batch_is_encoded_once(tiny_models, images, monkeypatch):
    blip = tiny_models["captioner"]
    rows: list[int] = []
    encode = blip.model.encode_image
    monkeypatch.setattr(blip.model, "encode_image", lambda pixels: (rows.append(pixels.shape[0]), encode(pixels))[1])
    works = [
        CaptionWork([_item(images[0]), _item(images[1])]),
        CaptionWork([_item(images[1].copy()), _item(images[0])]),
    ]
    merged = dispatch(blip, "caption", CaptionOptions(), works)
    assert rows == [2]  # four images asked for, two distinct, one ViT pass over two
    assert merged[0][0][0].token_ids == merged[1][1][0].token_ids


def test_waits_longer_for_requests_still_being_prepared():
    runner = Recorder()
    batcher = MicroBatcher(runner, max_batch=8, max_wait_ms=40, queue_size=8)
    batcher.start()

    async def go():
        first, second = batcher.admit(), batcher.admit()
        early = asyncio.ensure_future(batcher.submit("k", "early", 1, first))
        await asyncio.sleep(0.08)  # past max_wait, within 4 x max_wait: "late" was still being prepared
        late = await batcher.submit("k", "late", 1, second)
        return await early, late

    try:
        assert run_async(go()) == (("k", "early"), ("k", "late"))
    finally:
        batcher.close(5)
    assert [len(p) for _, p in runner.batches] == [2]


def test_a_lone_request_does_not_wait():
    batcher = MicroBatcher(Recorder(), max_batch=8, max_wait_ms=500, queue_size=8)
    batcher.start()

    async def one() -> float:
        slot = batcher.admit()
        start = time.perf_counter()
        with slot:
            await batcher.submit("k", 1, 1, slot)
        return time.perf_counter() - start

    try:
        run_async(one())  # the previous batch: none, then one request
        assert run_async(one()) < 0.25
    finally:
        batcher.close(5)
