"""Streaming from the one decoding loop: `token_listener` reports each step's new tokens per row, once per step, for
greedy and sampling decoding over the eager and the fixed-shape (static) steppers, and nothing for beam search or
without a listener; a listener that raises stops the decoding. The text side (`blip.tasks.streaming`): each result's
text so far, cut at settled words, joins to exactly the finished text (BLIP captions with their prompt, answers), and
the settling rule holds back what a tokenizer's cleanup or a byte-level BPE token could still change."""

from __future__ import annotations

import pytest
import torch

from blip.models.generation import generate, token_listener
from blip.models.static_decode import text_decoder_stepper
from blip.tasks.caption import caption_images, prompt_prefix
from blip.tasks.options import CaptionOptions, VqaOptions
from blip.tasks.streaming import TextDeltas, partial_text, settled
from blip.tasks.vqa import encode_questions
from oracle import make_images

MAX_NEW = 12
PROMPT = "a picture of"


def _listened(run):
    calls: list[tuple[int, list[int], list[int]]] = []
    with token_listener(lambda step, rows, tokens: calls.append((step, rows, tokens))):
        out = run()
    return out, calls


def _assert_reports(calls, generated: list[list[int]]) -> None:
    """One call per step until the last row ends, each with exactly the rows still decoding and their new tokens."""
    assert [step for step, _, _ in calls] == list(range(max(len(g) for g in generated)))
    for step, rows, tokens in calls:
        assert rows == [r for r, g in enumerate(generated) if len(g) > step]
        assert tokens == [generated[r][step] for r in rows]


def _caption(captioner, images, mode: str, **settings):
    decoder = captioner.model.text_decoder
    generation = CaptionOptions(**{"max_new_tokens": MAX_NEW, **settings}).generation()
    prefix = prompt_prefix(captioner, settings.get("prompt"))
    with torch.inference_mode():
        cross = decoder.bert.cross_kv(captioner.model.encode_image(captioner.transform(images)))
        stepper = text_decoder_stepper(decoder, cross, prefix, mode)
        eos = captioner.config.text.sep_token_id
        out, calls = _listened(lambda: generate(stepper, generation, eos_id=eos))
    generated = [seq.token_ids[len(prefix) :] for source in out for seq in source]
    return generated, calls


SETTINGS = {
    "greedy": dict(),
    "greedy_prompt": dict(prompt=PROMPT, repetition_penalty=1.3),
    "sample_n2": dict(do_sample=True, seed=3, num_captions=2, top_p=0.9),
}


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_listener_hears_every_step_of_every_row(captioner, setting, mode):
    generated, calls = _caption(captioner, make_images(3, seed=3), mode, **SETTINGS[setting])
    assert len({len(g) for g in generated}) > 1  # rows end at different steps: finished rows are left out
    _assert_reports(calls, generated)


def test_static_greedy_reports_no_step_after_the_last_row_ends(captioner):
    """The fixed-shape greedy loop runs a few steps past the last end (it checks every few steps): none reported."""
    eager, eager_calls = _caption(captioner, make_images(3, seed=3), "eager", max_new_tokens=40)
    static, static_calls = _caption(captioner, make_images(3, seed=3), "static", max_new_tokens=40)
    assert static == eager and static_calls == eager_calls
    assert max(len(g) for g in eager) < 40


def test_beam_search_and_no_listener_report_nothing(captioner):
    images = make_images(2, seed=5)
    _, calls = _caption(captioner, images, "eager", num_beams=3)
    assert calls == []
    with token_listener(lambda *_: pytest.fail("the listener left its block")):
        pass
    assert captioner.caption(images, max_new_tokens=MAX_NEW)  # no listener set: nothing is called


def test_a_listener_that_raises_stops_the_decoding(captioner):
    class Stop(Exception):
        pass

    steps = []

    def listener(step, rows, tokens):
        steps.append(step)
        if step == 2:
            raise Stop

    generation = CaptionOptions(max_new_tokens=MAX_NEW).generation()
    with token_listener(listener), pytest.raises(Stop):
        caption_images(captioner, make_images(1, seed=5), prompt=None, generation=generation)
    assert steps == [0, 1, 2]


def test_vqa_answers_are_reported_per_question(answerer):
    images = make_images(2, seed=6)
    questions = ["what is it?", "how many dogs are there?", "where?"]
    generation = VqaOptions(max_new_tokens=6).generation()
    with torch.inference_mode():
        states, mask = encode_questions(answerer, images, questions, [0, 1, 0])
        cross = answerer.model.text_decoder.bert.cross_kv(states, mask)
        bos, eos = answerer.config.text.bos_token_id, answerer.config.text.sep_token_id
        stepper = text_decoder_stepper(answerer.model.text_decoder, cross, [bos], "static")
        out, calls = _listened(lambda: generate(stepper, generation, eos_id=eos))
    _assert_reports(calls, [seq.token_ids[1:] for (seq,) in out])


# --- the text side ----------------------------------------------------------------------------------------------------


def _streamed(text_of, generated: list[int], final: str) -> list[str]:
    """The deltas a stream sends for one result: one update per step, then the rest of the final text."""
    deltas = TextDeltas()
    pieces = [deltas.update(text_of(generated[: n + 1])) for n in range(len(generated))]
    return [p for p in pieces if p] + [deltas.finish(final)]


@pytest.mark.parametrize("prompt", [None, PROMPT])
def test_streamed_captions_join_to_the_caption(captioner, prompt):
    images = make_images(4, seed=11)
    sampled = captioner.caption(images, prompt=prompt, do_sample=True, seed=1, num_captions=2, max_new_tokens=20)
    greedy = captioner.caption(images, prompt=prompt, max_new_tokens=20)
    text_of = partial_text(captioner, "caption", prompt)
    prefix = len(prompt_prefix(captioner, prompt))
    sent = 0
    for caption in [c for group in sampled for c in group] + greedy:
        pieces = _streamed(text_of, caption.token_ids[prefix:], caption.text)
        assert "".join(pieces) == caption.text
        sent += len(pieces) > 2  # the text came in several pieces before the end
    assert sent > 0


def test_streamed_answers_join_to_the_answer(answerer):
    images = make_images(4, seed=12)
    questions = ["is there a cat?", "what is it?", "how many dogs are there?"]
    answers = answerer.answer([i for i in images for _ in questions], questions * 4, max_new_tokens=8)
    text_of = partial_text(answerer, "vqa", None)
    for answer in answers:
        assert "".join(_streamed(text_of, answer.token_ids[1:], answer.text)) == answer.text
    assert any(" " in a.text for a in answers)  # answers of several words among them


def test_settled_text_holds_back_what_can_still_change():
    assert settled("a dog") == "a" and settled("a dog ") == "a dog" and settled("dog") == ""
    # later tokens that change earlier characters: cleanup ("dog ." -> "dog.", "' s" -> "'s"), a WordPiece "##"
    # piece, a byte-level BPE token that ends inside a UTF-8 character
    decodes = ["a", "a dog", "a dog '", "a dog's", "a dog's tail", "a dog's tail.", "a dog's tail. caf\ufffd"]
    final = "a dog's tail. café au lait"
    deltas = TextDeltas()
    pieces = [deltas.update(text) for text in decodes]
    assert pieces == ["", "a", " dog", "", "'s", "", " tail."]
    assert "".join(pieces) + deltas.finish(final) == final
    again = TextDeltas()
    assert again.update("a big dog") == "a big" and again.update("a bi") == ""  # never takes text back
    assert again.finish("a big dog") == " dog"


def test_settled_text_holds_back_a_word_cleanup_can_still_join():
    """transformers' cleanup joins " n't" across three tokens ("do n ' t" -> "don't"): the "n" seen before the rest
    arrives is not settled, so the streamed text stays the start of the final one."""
    from blip.text_cleanup import clean_up_tokenization

    tokens = ["a", "do", "n", "'", "t", "dog", "."]
    deltas = TextDeltas()
    pieces = [deltas.update(clean_up_tokenization(" ".join(tokens[:k]))) for k in range(1, len(tokens) + 1)]
    final = clean_up_tokenization(" ".join(tokens))
    assert final == "a don't dog."
    assert "".join(pieces) + deltas.finish(final) == final
    assert settled("a do n") == "a do" and settled("a do n '") == "a do" and settled("a n-word") == "a"
