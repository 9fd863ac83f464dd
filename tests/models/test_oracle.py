"""Oracle tests: transformers-made random-weight checkpoints, loaded by `blip.load`, give transformers' outputs.

The reference for every output is transformers run on that image (and that text) alone; ours runs batched.
"""

from __future__ import annotations

import pytest
import torch

import blip
from oracle import TinySpec, hf_load, make_images

CAPTION_SPECS = {
    "small": TinySpec(kind="caption"),
    "wide-text": TinySpec(
        kind="caption", text_hidden=48, text_heads=3, text_ffn=64, vision_hidden=24, vision_heads=3, seed=1
    ),
    "deep-patch4": TinySpec(
        kind="caption", vision_layers=3, text_layers=3, image_size=24, patch_size=4, extra_vocab=37, seed=2
    ),
    "one-head": TinySpec(
        kind="caption", text_heads=1, vision_heads=1, image_size=48, patch_size=16, seed=3, eos_bias=2.5
    ),
}


def hf_greedy_score(out, prefix_len: int) -> float:
    tokens = out.sequences[0, prefix_len:]
    return sum(torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens))


def hf_caption(hf, processor, image, prompt, **gen):
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, output_scores=True, return_dict_in_generate=True, **gen)
    prefix_len = inputs["input_ids"].shape[1] - 1 if prompt else 1
    ids = out.sequences[0].tolist()
    score = out.sequences_scores[0].item() if gen.get("num_beams", 1) > 1 else hf_greedy_score(out, prefix_len)
    return ids, score, processor.decode(out.sequences[0], skip_special_tokens=True)


@pytest.mark.parametrize("name", list(CAPTION_SPECS))
@pytest.mark.parametrize("prompt", [None, "a picture of"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_matches_transformers(hf_checkpoints, name, prompt, num_beams):
    folder = hf_checkpoints(CAPTION_SPECS[name])
    ours = blip.load(folder)
    hf, processor = hf_load(folder, "caption")
    images = make_images(5, seed=len(name))
    results = ours.caption(images, prompt=prompt, num_beams=num_beams, max_new_tokens=12)
    lengths = set()
    for image, result in zip(images, results):
        ids, score, text = hf_caption(hf, processor, image, prompt, num_beams=num_beams, max_new_tokens=12)
        assert result.token_ids == ids
        assert result.score == pytest.approx(score, abs=1e-4)
        assert result.text == text
        lengths.add(len(ids))
    if num_beams == 1 and prompt is None and name == "small":
        assert len(lengths) > 1, "generations should end at different lengths to exercise early exit"


def test_caption_min_tokens_and_repetition_penalty(hf_checkpoints):
    folder = hf_checkpoints(CAPTION_SPECS["one-head"])
    ours = blip.load(folder)
    hf, processor = hf_load(folder, "caption")
    images = make_images(4, seed=9)
    for gen in (
        dict(num_beams=1, min_new_tokens=5, repetition_penalty=1.3),
        dict(num_beams=3, min_new_tokens=4, repetition_penalty=1.1, length_penalty=0.6),
        dict(num_beams=2, max_new_tokens=7, length_penalty=2.0),
    ):
        gen.setdefault("max_new_tokens", 10)
        results = ours.caption(images, prompt="a photo of", **gen)
        for image, result in zip(images, results):
            ids, score, _ = hf_caption(hf, processor, image, "a photo of", **gen)
            assert result.token_ids == ids, gen
            assert result.score == pytest.approx(score, abs=1e-4)


def test_several_beam_captions_match_num_return_sequences(hf_checkpoints):
    folder = hf_checkpoints(CAPTION_SPECS["small"])
    ours = blip.load(folder)
    hf, processor = hf_load(folder, "caption")
    image = make_images(1, seed=4)[0]
    captions = ours.caption([image], num_beams=4, num_captions=3, max_new_tokens=10)[0]
    inputs = processor(images=image, return_tensors="pt")
    out = hf.generate(
        **inputs,
        num_beams=4,
        num_return_sequences=3,
        max_new_tokens=10,
        output_scores=True,
        return_dict_in_generate=True,
    )
    for cap, seq, score in zip(captions, out.sequences, out.sequences_scores):
        ids = seq.tolist()
        while len(ids) > len(cap.token_ids) and ids[-1] == 0:
            ids.pop()  # transformers pads shorter returned beams
        assert cap.token_ids == ids
        assert cap.score == pytest.approx(score.item(), abs=1e-4)


def test_batch_composition_does_not_change_results(hf_checkpoints):
    ours = blip.load(hf_checkpoints(CAPTION_SPECS["small"]))
    images = make_images(16, seed=7)
    alone = [ours.caption(img, num_beams=3, max_new_tokens=10)[0] for img in images[:4]]
    batched = ours.caption(images, num_beams=3, max_new_tokens=10)[:4]
    assert [c.token_ids for c in alone] == [c.token_ids for c in batched]
    ours.batch_size = 3
    assert [c.token_ids for c in ours.caption(images[:4], num_beams=3, max_new_tokens=10)] == [
        c.token_ids for c in alone
    ]


def test_sampling_is_seeded_and_respects_top_k(hf_checkpoints):
    ours = blip.load(hf_checkpoints(CAPTION_SPECS["small"]))
    images = make_images(3, seed=11)
    a = ours.caption(images, do_sample=True, top_p=0.9, seed=5, num_captions=2, max_new_tokens=8)
    b = ours.caption(images, do_sample=True, top_p=0.9, seed=5, num_captions=2, max_new_tokens=8)
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]
    assert all(len(r) == 2 for r in a)
    # top_k=1 sampling is greedy decoding
    greedy = ours.caption(images, max_new_tokens=8)
    sampled = ours.caption(images, do_sample=True, top_k=1, seed=1, max_new_tokens=8)
    assert [c.token_ids for c in greedy] == [c.token_ids for c in sampled]


VQA_SPEC = TinySpec(kind="vqa", text_hidden=32, vision_hidden=32, seed=5)
QUESTIONS = [
    "how many dogs are there?",
    "what color is the sky",
    "where is the woman sitting?",
    "is it a cat?",
    "what shape is on the left?",
    "two?",
]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_vqa_generate_matches_transformers(hf_checkpoints, num_beams):
    folder = hf_checkpoints(VQA_SPEC)
    ours = blip.load(folder)
    hf, processor = hf_load(folder, "vqa")
    images = make_images(3, seed=21)
    # one image, six questions (image encoded once) and pairwise mixed images
    cases = [
        ([images[0]] * len(QUESTIONS), ours.answer(images[0], QUESTIONS, num_beams=num_beams)),
        (images, ours.answer(images, QUESTIONS[:3], num_beams=num_beams)),
    ]
    for case_images, answers in cases:
        for image, question, answer in zip(case_images, QUESTIONS, answers):
            inputs = processor(images=image, text=question, return_tensors="pt")
            with torch.no_grad():
                out = hf.generate(**inputs, num_beams=num_beams, max_new_tokens=10)
            assert answer.token_ids == out[0].tolist(), question
            assert answer.text == processor.decode(out[0], skip_special_tokens=True)


def test_vqa_rank_mode_picks_the_best_scoring_answer(hf_checkpoints):
    ours = blip.load(hf_checkpoints(VQA_SPEC))
    image = make_images(1, seed=3)[0]
    candidates = ["yes", "no", "two", "red", "on the beach", "blue square"]
    ranked = ours.answer(image, QUESTIONS[:3], answers=candidates)
    assert all(a.text in candidates for a in ranked)
    # the rank score is the teacher-forced, label-smoothed log-likelihood: check one by brute force
    ids, mask = ours.tokenizer(candidates)
    ids[:, 0] = ours.config.text.bos_token_id
    from blip.tasks.vqa import encode_questions

    decoded = [image.convert("RGB")]
    states, qmask = encode_questions(ours, decoded, QUESTIONS[:1], [0])
    with torch.no_grad():
        logits = ours.model.lm_logits(
            ids, mask, states.expand(len(candidates), -1, -1), qmask.expand(len(candidates), -1)
        )
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, reduction="none", label_smoothing=0.1
    ).sum(1)
    assert ranked[0].text == candidates[int(loss.argmin())]
    assert ranked[0].score == pytest.approx(-loss.min().item(), abs=1e-4)


RETRIEVAL_SPECS = [
    TinySpec(kind="retrieval", text_hidden=40, text_heads=5, seed=6),
    TinySpec(
        kind="retrieval",
        vision_hidden=48,
        vision_heads=4,
        image_size=40,
        patch_size=10,
        text_layers=3,
        seed=7,
        extra={"embed_dim": 16},
    ),
]
TEXTS = ["a red circle on the left", "two dogs on the beach", "a woman sitting", "blue", "what is this?"]


@pytest.mark.parametrize("spec", RETRIEVAL_SPECS, ids=["a", "b"])
def test_itm_and_itc_match_transformers(hf_checkpoints, spec):
    folder = hf_checkpoints(spec)
    ours = blip.load(folder)
    hf, processor = hf_load(folder, "retrieval")
    images = make_images(3, seed=31)
    probs = ours.match(images[0], TEXTS)
    pair_probs = ours.match(images, TEXTS[:3])
    sims = ours.similarity(images, TEXTS)
    for j, text in enumerate(TEXTS):
        for i, image in enumerate(images):
            inputs = processor(images=image, text=text, return_tensors="pt")
            with torch.no_grad():
                itm = hf(**inputs).itm_score.softmax(-1)[0, 1].item()
                itc = hf(**inputs, use_itm_head=False).itm_score[0, 0].item()
            assert sims[i, j].item() == pytest.approx(itc, abs=1e-4)
            if i == 0:
                assert probs[j] == pytest.approx(itm, abs=1e-4)
            if i == j:
                assert pair_probs[i] == pytest.approx(itm, abs=1e-4)


def test_encoder_outputs_match_transformers(hf_checkpoints):
    folder = hf_checkpoints(RETRIEVAL_SPECS[0])
    ours = blip.load(folder)
    hf, processor = hf_load(folder, "retrieval")
    inputs = processor(images=make_images(4, seed=2), text=TEXTS[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours_image = ours.model.encode_image(inputs["pixel_values"])
        hf_image = hf.vision_model(inputs["pixel_values"]).last_hidden_state
        ours_text = ours.model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        hf_text = hf.text_encoder(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).last_hidden_state
        ours_mm = ours.model.encode_multimodal(inputs["input_ids"], inputs["attention_mask"], ours_image)
        hf_mm = hf.text_encoder(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], encoder_hidden_states=hf_image
        ).last_hidden_state
    valid = inputs["attention_mask"].bool()
    assert (ours_image - hf_image).abs().max() < 1e-4
    assert (ours_text - hf_text)[valid].abs().max() < 1e-4
    assert (ours_mm - hf_mm)[valid].abs().max() < 1e-4


def test_pixel_preprocessing_matches_processor(hf_checkpoints):
    folder = hf_checkpoints(CAPTION_SPECS["small"])
    ours = blip.load(folder)
    _, processor = hf_load(folder, "caption")
    images = make_images(6, seed=12)
    ref = processor(images=images, return_tensors="pt")["pixel_values"]
    assert (ours.transform(images) - ref).abs().max() < 1e-6


def test_interpolated_position_embeddings_match_transformers(hf_checkpoints):
    folder = hf_checkpoints(CAPTION_SPECS["small"])
    ours = blip.load(folder, image_size=48)
    hf, processor = hf_load(folder, "caption")
    image = make_images(1, seed=8)[0]
    pixels = processor(images=image, size={"height": 48, "width": 48}, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = hf.generate(pixel_values=pixels, interpolate_pos_encoding=True, max_new_tokens=10)
        ref = hf.vision_model(pixels, interpolate_pos_encoding=True).last_hidden_state
        mine = ours.model.encode_image(pixels)
    assert (mine - ref).abs().max() < 1e-4
    assert ours.caption(image, max_new_tokens=10)[0].token_ids == out[0].tolist()


def test_base_size_caption_matches_transformers(tmp_path):
    """The real BLIP-base shapes (ViT-B/16 at 384, 12-layer BERT with 12 heads), random weights (~30 s)."""
    import transformers

    from oracle import base_spec, build_hf_checkpoint

    spec = base_spec("caption", full_vocab=False)
    folder = build_hf_checkpoint(tmp_path / "base", spec)
    ours = blip.load(folder)
    hf = transformers.BlipForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.BlipProcessor.from_pretrained(folder)
    images = make_images(2, seed=1)
    for num_beams in (1, 3):
        results = ours.caption(images, num_beams=num_beams, max_new_tokens=8)
        for image, result in zip(images, results):
            ids, score, _ = hf_caption(hf, processor, image, None, num_beams=num_beams, max_new_tokens=8)
            assert result.token_ids == ids
            assert result.score == pytest.approx(score, abs=1e-4)
