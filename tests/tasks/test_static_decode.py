"""Static-cache decoding (`blip.models.static_decode`) gives the eager path's captions and answers token for token
(scores equal to float rounding): greedy, beam search with rows and sources finishing early, sampling with a seed and
with per-image generators, prompts, at batch sizes that are and are not source buckets. The graph cache's logic
(which bucket, reuse, eviction, fallback when capture fails) runs on the CPU with a fake capture that behaves like a
graph: the step's output is one tensor, overwritten by every replay."""

from __future__ import annotations

import logging

import pytest
import torch

from blip.models.generation import generate
from blip.models.static_decode import (
    GraphCache,
    StaticTextDecoderStepper,
    source_bucket,
    text_decoder_stepper,
    uses_static,
)
from blip.tasks.caption import caption_images
from blip.tasks.options import CaptionOptions, OptionError, VqaOptions
from oracle import make_images

MAX_NEW = 12


def _flat(results) -> list:
    return [c for r in results for c in (r if isinstance(r, list) else [r])]


def _assert_same(eager, static) -> None:
    eager, static = _flat(eager), _flat(static)
    assert [c.token_ids for c in static] == [c.token_ids for c in eager]
    for a, b in zip(eager, static):
        assert b.score == pytest.approx(a.score, abs=1e-5)


CAPTION_SETTINGS = {
    "greedy": dict(),
    "greedy_min_len_penalty": dict(min_new_tokens=3, repetition_penalty=1.3),
    "beam3": dict(num_beams=3, num_captions=2),
    "beam3_prompt": dict(num_beams=3, prompt="a picture of", length_penalty=0.5),
    "sample_seed": dict(do_sample=True, seed=4, num_captions=2, top_k=20, top_p=0.8, temperature=0.9),
}


@pytest.mark.parametrize("count", [3, 4])  # 4 sources fill their bucket; 3 leave a padded slot
@pytest.mark.parametrize("setting", list(CAPTION_SETTINGS))
def test_static_captions_equal_eager(captioner, setting, count):
    images = make_images(count, seed=3)
    settings = dict(max_new_tokens=MAX_NEW, **CAPTION_SETTINGS[setting])
    eager = captioner.caption(images, decode="eager", **settings)
    static = captioner.caption(images, decode="static", **settings)
    _assert_same(eager, static)
    lengths = {len(c.token_ids) for c in _flat(eager)}
    assert len(lengths) > 1  # rows finish at different steps, so finished rows and leaving sources are exercised


def test_static_sampling_with_per_image_generators_equals_eager(captioner):
    images = make_images(5, seed=8)
    generation = CaptionOptions(do_sample=True, num_captions=3, max_new_tokens=MAX_NEW).generation()
    out = {}
    for mode in ("eager", "static"):
        gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7, 8, 9)]
        cfg = type(generation)(**{**generation.__dict__, "decode": mode})
        out[mode] = caption_images(captioner, images, prompt=None, generation=cfg, generators=gens)
    _assert_same(out["eager"], out["static"])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_static_vqa_answers_equal_eager(answerer, num_beams):
    images = make_images(3, seed=5)
    questions = ["what is it?", "how many dogs are in the picture on the left?", "where?", "what color is the sky?"]
    pairs = [images[0], images[1], images[2], images[0]]  # questions of different lengths: a masked cross-attention
    eager = answerer.answer(pairs, questions, num_beams=num_beams, max_new_tokens=6, decode="eager")
    static = answerer.answer(pairs, questions, num_beams=num_beams, max_new_tokens=6, decode="static")
    _assert_same(eager, static)


# --- buckets, modes, options ------------------------------------------------------------------------------------------


def test_source_buckets():
    assert [source_bucket(n) for n in (1, 2, 3, 4, 5, 9, 16, 17, 100, 128, 129, 200)] == [
        1, 2, 4, 4, 8, 16, 16, 32, 128, 128, 192, 256,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        source_bucket(0)


def test_modes_pick_the_stepper(captioner):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not uses_static("auto", cpu) and uses_static("auto", cuda)
    assert uses_static("static", cpu) and not uses_static("eager", cuda)
    with pytest.raises(ValueError, match="decode must be one of"):
        uses_static("fast", cpu)
    decoder = captioner.model.text_decoder
    cross = decoder.bert.cross_kv(captioner.model.encode_image(torch.zeros(1, 3, 32, 32)))
    assert isinstance(text_decoder_stepper(decoder, cross, [1], "static"), StaticTextDecoderStepper)
    assert not isinstance(text_decoder_stepper(decoder, cross, [1], "auto"), StaticTextDecoderStepper)


def test_decode_option_is_checked_and_not_part_of_a_jobs_fingerprint():
    with pytest.raises(OptionError, match="decode: must be one of auto, static, eager"):
        CaptionOptions(decode="graphs")
    with pytest.raises(OptionError, match="decode: must be one of"):
        VqaOptions(decode="")
    assert CaptionOptions(decode="static").describe() == CaptionOptions(decode="eager").describe()
    assert VqaOptions(decode="static").generation().decode == "static"


# --- the graph cache, with a fake capture -----------------------------------------------------------------------------


class FakeCapture:
    """Behaves as a CUDA graph does for the stepper: the replay writes the step's result into one output tensor."""

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, 0

    def __call__(self, step):
        self.calls += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nsecond line")
        out = step()

        def replay():
            out.copy_(step())
            return out

        return replay


def _decode(captioner, count: int, graphs: GraphCache, **settings):
    decoder = captioner.model.text_decoder
    with torch.inference_mode():
        pixels = captioner.transform(make_images(count, seed=11))
        cross = decoder.bert.cross_kv(captioner.model.encode_image(pixels))
        generation = CaptionOptions(**{"max_new_tokens": MAX_NEW, **settings}).generation()
        bos, eos = captioner.config.text.bos_token_id, captioner.config.text.sep_token_id
        eager = generate(text_decoder_stepper(decoder, cross, [bos], "eager"), generation, eos_id=eos)
        stepper = StaticTextDecoderStepper(decoder, cross, [bos], graphs=graphs)
        static = generate(stepper, generation, eos_id=eos)
    assert [[s.token_ids for s in r] for r in static] == [[s.token_ids for s in r] for r in eager]
    return stepper


def test_graphs_are_captured_once_per_bucket_and_reused(captioner):
    capture = FakeCapture()
    graphs = GraphCache(capacity=2, capture=capture)
    first = _decode(captioner, 3, graphs)
    assert capture.calls == graphs.captures == 1
    assert (first.key.sources, first.key.rows, first.key.length) == (4, 4, 32)  # 1 + 12 positions, rounded up
    _decode(captioner, 4, graphs)  # same bucket: the same graph and buffers
    _decode(captioner, 3, graphs, max_new_tokens=20)  # 21 positions: the same rounded length
    assert capture.calls == 1 and len(graphs.entries) == 1
    again = _decode(captioner, 2, graphs, num_beams=3)  # 2 sources x 3 beams: another key
    assert (again.key.sources, again.key.rows) == (2, 6) and capture.calls == 2
    _decode(captioner, 5, graphs)  # a third key: the least recently used (3 and 4 sources) is dropped
    assert capture.calls == 3 and len(graphs.entries) == 2 and first.key not in graphs.entries
    _decode(captioner, 4, graphs)
    assert capture.calls == 4


def test_a_failed_capture_falls_back_to_the_uncaptured_step_with_the_reason_logged(captioner, caplog):
    capture = FakeCapture(fail=True)
    graphs = GraphCache(capture=capture)
    with caplog.at_level(logging.WARNING, logger="blip.decode"):
        stepper = _decode(captioner, 3, graphs, num_beams=3)
    entry = graphs.entries[stepper.key]
    assert entry.replay is None and entry.failed == "RuntimeError: operation not permitted when stream is capturing"
    assert "CUDA graph capture failed" in caplog.text and "stream is capturing" in caplog.text
    _decode(captioner, 3, graphs, num_beams=3)  # the same key is not tried again
    assert capture.calls == 1 and graphs.captures == 0


def test_fixed_shape_greedy_keeps_every_row_and_stops_soon_after_the_last_finishes(captioner, monkeypatch):
    from blip.models import generation

    calls = {"select": 0, "step": 0}
    real_select, real_step = StaticTextDecoderStepper.select, StaticTextDecoderStepper.step

    def select(self, rows, sources):
        calls["select"] += 1
        return real_select(self, rows, sources)

    def step(self, tokens):
        calls["step"] += 1
        return real_step(self, tokens)

    monkeypatch.setattr(StaticTextDecoderStepper, "select", select)
    monkeypatch.setattr(StaticTextDecoderStepper, "step", step)
    images = make_images(3, seed=3)
    eager = captioner.caption(images, decode="eager", max_new_tokens=40)
    static = captioner.caption(images, decode="static", max_new_tokens=40)
    _assert_same(eager, static)
    longest = max(len(c.token_ids) for c in eager) - 1  # new tokens of the longest caption (prefix: [DEC])
    assert longest < 40 and calls["select"] == 0  # no row left the batch
    assert longest - 1 <= calls["step"] < longest - 1 + generation.FINISHED_CHECK_EVERY
    calls.update(select=0, step=0)
    captioner.caption(images, decode="static", max_new_tokens=40, do_sample=True, seed=1)
    assert calls["select"] > 0  # sampling keeps the eager bookkeeping (finished sources leave)


# --- on a GPU (skipped without CUDA): real CUDA graphs ---------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_give_the_eager_captions(caption_dir):
    import blip
    from blip.models.static_decode import graph_cache

    model = blip.load(caption_dir, device="cuda")
    images = make_images(5, seed=3)
    for settings in (dict(), dict(num_beams=3, num_captions=2), dict(do_sample=True, seed=4)):
        eager = model.caption(images, decode="eager", max_new_tokens=MAX_NEW, **settings)
        static = model.caption(images, decode="auto", max_new_tokens=MAX_NEW, **settings)
        _assert_same(eager, static)
    graphs = graph_cache(model.model.text_decoder)
    assert graphs.captures >= 2 and all(e.failed is None and e.replay is not None for e in graphs.entries.values())
