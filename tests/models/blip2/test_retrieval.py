"""BLIP-2 retrieval (Blip2ForImageTextRetrieval) through `blip.load`: ITM probabilities, ITC similarities, the
vision encoder and the Q-Former equal transformers' with random weights, for several tiny shapes."""

from __future__ import annotations

import pytest
import torch

import blip
from oracle import make_images
from oracle_blip2 import Blip2Spec, checkpoint_factory, hf_blip2_load, hf_blip2_processor

SPECS = {
    "base": Blip2Spec(kind="retrieval"),
    "freq1-wide": Blip2Spec(
        kind="retrieval",
        cross_attention_frequency=1,
        vision_hidden=48,
        vision_heads=4,
        qformer_hidden=40,
        qformer_heads=5,
        qformer_layers=3,
        num_query_tokens=6,
        embed_dim=12,
        qformer_vocab_extra=50,
        image_token=False,
        seed=3,
    ),
    "freq3-nobias": Blip2Spec(
        kind="retrieval",
        cross_attention_frequency=3,
        qformer_layers=4,
        qkv_bias=False,
        image_size=32,
        patch_size=8,
        num_query_tokens=3,
        seed=5,
    ),
}
TEXTS = ["a red circle", "two dogs on the beach , sitting near the water", "what"]


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    return checkpoint_factory(tmp_path_factory)


@pytest.mark.parametrize("name", list(SPECS))
def test_itm_and_itc_equal_transformers(make, name):
    folder = make(SPECS[name])
    hf, processor = hf_blip2_load(folder), hf_blip2_processor(folder)
    ours = blip.load(folder)
    assert isinstance(ours, blip.Blip) and ours.tasks == {"itm", "itc"}
    images = make_images(2, seed=1)
    with torch.no_grad():
        for image in images:  # transformers: one image with every text (padded batch)
            inputs = processor(images=[image] * len(TEXTS), text=TEXTS, padding=True, return_tensors="pt")
            itm = hf(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
            torch.testing.assert_close(torch.tensor(ours.match(image, TEXTS)), itm, atol=1e-4, rtol=1e-4)
        inputs = processor(images=images, text=TEXTS, padding=True, return_tensors="pt")
        itc = hf(**inputs, use_image_text_matching_head=False).logits_per_image  # [images, texts]: max over queries
    similarity = ours.similarity(images, TEXTS)
    assert similarity.shape == (2, 3)
    torch.testing.assert_close(similarity, itc, atol=1e-4, rtol=1e-4)
    spec = SPECS[name]
    assert ours.embed_images(images).shape == (2, spec.num_query_tokens, spec.embed_dim)
    assert ours.embed_texts(TEXTS).shape == (3, spec.embed_dim)


def test_pairs_and_one_image_many_texts_agree(make):
    ours = blip.load(make(SPECS["base"]))
    images = make_images(3, seed=2)
    pairwise = ours.match(images, TEXTS)
    one_by_one = [ours.match(image, text)[0] for image, text in zip(images, TEXTS)]
    torch.testing.assert_close(torch.tensor(pairwise), torch.tensor(one_by_one), atol=1e-5, rtol=1e-5)
    assert len(set(round(p, 6) for p in pairwise)) == 3  # not degenerate


@pytest.mark.parametrize("name", ["base", "freq3-nobias"])
def test_vision_and_query_outputs_equal_transformers(make, name):
    spec = SPECS[name]
    folder = make(spec)
    hf, model = hf_blip2_load(folder), blip.load(folder).model
    pixels = torch.randn(2, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.encode_image(pixels)
        theirs = hf.vision_model(pixels).last_hidden_state
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        queries = hf.query_tokens.expand(2, -1, -1)
        expected = hf.qformer(query_embeds=queries, encoder_hidden_states=theirs).last_hidden_state
        got = model.query_output(ours)
    assert got.shape == (2, spec.num_query_tokens, spec.qformer_hidden)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_wrong_task_names_the_checkpoint_kind(make):
    ours = blip.load(make(SPECS["base"]))
    with pytest.raises(ValueError, match="blip2-opt-2.7b"):
        ours.caption(make_images(1)[0])
    with pytest.raises(ValueError, match="blip2-opt-2.7b"):
        ours.answer(make_images(1)[0], "what is it?")
    with pytest.raises(ValueError, match="text 0 is empty"):
        ours.match(make_images(1)[0], " ")
