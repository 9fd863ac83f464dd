"""BLIP-2 generation checkpoints (Blip2ForConditionalGeneration) through `blip.load`: the vision encoder, the
Q-Former outputs, the projected language inputs and the language model's logits over [queries; prompt] equal
transformers' (random weights, several tiny shapes), with every key loaded strictly."""

from __future__ import annotations

import pytest
import torch

import blip
from oracle_blip2 import Blip2Spec, checkpoint_factory, hf_blip2_load, pixels

SPECS = {
    "opt": Blip2Spec(kind="opt"),
    "opt-freq1": Blip2Spec(
        kind="opt",
        cross_attention_frequency=1,
        qformer_layers=3,
        qformer_hidden=40,
        qformer_heads=2,
        num_query_tokens=5,
        lm_hidden=32,
        lm_heads=4,
        lm_vocab=120,
        image_size=42,
        seed=2,
    ),
    "opt-freq3-nobias": Blip2Spec(
        kind="opt",
        cross_attention_frequency=3,
        qformer_layers=4,
        qkv_bias=False,
        vision_hidden=24,
        vision_heads=3,
        image_token=False,
        seed=4,
    ),
    "t5": Blip2Spec(kind="t5"),
    "t5-freq2-wide": Blip2Spec(
        kind="t5", qformer_hidden=48, qformer_heads=6, num_query_tokens=7, lm_hidden=32, lm_heads=4, seed=6
    ),
    "t5-untied-freq1": Blip2Spec(
        kind="t5",
        cross_attention_frequency=1,
        untied_head=True,
        image_size=56,
        extra={
            "text": {"relative_attention_num_buckets": 16, "feed_forward_proj": "relu", "tie_word_embeddings": True}
        },
        seed=8,
    ),
}


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    return checkpoint_factory(tmp_path_factory)


def _needs(kind: str) -> None:
    pytest.importorskip(f"blip.models.blip2.{'t5' if kind == 't5' else 'opt'}")


@pytest.mark.parametrize("name", list(SPECS))
def test_query_outputs_and_language_inputs_equal_transformers(make, name):
    spec = SPECS[name]
    _needs(spec.kind)
    folder = make(spec)
    hf, ours = hf_blip2_load(folder), blip.load(folder)
    assert isinstance(ours, blip.Blip) and ours.tasks == {"caption", "vqa"}
    model = ours.model
    x = pixels(spec, 3, seed=1)
    with torch.no_grad():
        expected = hf.get_image_features(x)
        image = model.encode_image(x)
        query = model.query_output(image)
        inputs = model.language_inputs(query)
    torch.testing.assert_close(image, expected.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(query, expected.qformer_outputs.last_hidden_state, atol=1e-4, rtol=1e-4)
    assert inputs.shape == (3, spec.num_query_tokens, spec.lm_hidden)
    torch.testing.assert_close(inputs, expected.pooler_output, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["opt", "opt-freq1"])
def test_opt_logits_over_queries_and_prompt_equal_transformers(make, name):
    spec = SPECS[name]
    _needs("opt")
    folder = make(spec)
    hf, model = hf_blip2_load(folder), blip.load(folder).model
    q = spec.num_query_tokens
    ids = torch.tensor([[2, 10, 11, 12], [1, 2, 13, 14]])  # the second row left-padded
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    full_mask = torch.cat([torch.ones(2, q, dtype=torch.long), mask], dim=1)
    x = pixels(spec, 2, seed=3)
    with torch.no_grad():
        hf_ids = torch.cat([torch.full((2, q), hf.config.image_token_index), ids], dim=1)
        expected = hf(pixel_values=x, input_ids=hf_ids, attention_mask=full_mask).logits
        soft = model.language_inputs(model.query_output(model.encode_image(x)))
        embeds = torch.cat([soft, model.language_model.embed_tokens(ids)], dim=1)
        got = model.language_model(embeds, full_mask)
    real = full_mask.bool()  # logits at padding positions mean nothing
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["t5", "t5-untied-freq1"])
def test_t5_logits_over_queries_and_prompt_equal_transformers(make, name):
    spec = SPECS[name]
    _needs("t5")
    folder = make(spec)
    hf, model = hf_blip2_load(folder), blip.load(folder).model
    assert model.language_model.config.tie_word_embeddings == (not spec.untied_head)
    q = spec.num_query_tokens
    ids = torch.tensor([[10, 11, 12, 1], [13, 14, 1, 0]])  # the second row right-padded
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    decoder_ids = torch.tensor([[0, 5, 6], [0, 7, 1]])
    full_mask = torch.cat([torch.ones(2, q, dtype=torch.long), mask], dim=1)
    x = pixels(spec, 2, seed=5)
    with torch.no_grad():
        hf_ids = torch.cat([torch.full((2, q), hf.config.image_token_index), ids], dim=1)
        expected = hf(pixel_values=x, input_ids=hf_ids, attention_mask=full_mask, decoder_input_ids=decoder_ids).logits
        soft = model.language_inputs(model.query_output(model.encode_image(x)))
        embeds = torch.cat([soft, model.language_model.embed_tokens(ids)], dim=1)
        got = model.language_model(embeds, full_mask, decoder_ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_blip2_size_vision_and_opt_125m_sized_lm(tmp_path):
    """The real vision width (1408, 16 heads; 2 of its 39 layers), the real Q-Former (768, 12 heads, 12 layers,
    32 queries) and an OPT-125m-sized LM (768 wide, 12 layers, 50272 tokens)."""
    _needs("opt")
    from oracle_blip2 import build_blip2_checkpoint

    spec = Blip2Spec(
        kind="opt",
        vision_hidden=1408,
        vision_heads=16,
        vision_mlp=6144,
        vision_layers=2,
        image_size=224,
        patch_size=14,
        qformer_hidden=768,
        qformer_heads=12,
        qformer_layers=12,
        qformer_ffn=3072,
        num_query_tokens=32,
        lm_hidden=768,
        lm_heads=12,
        lm_layers=12,
        lm_ffn=3072,
        lm_vocab=50272,
    )
    folder = build_blip2_checkpoint(tmp_path / "b2", spec)
    hf, model = hf_blip2_load(folder), blip.load(folder).model
    x = pixels(spec, 1)
    ids = torch.tensor([[2, 100, 2000, 30000]])
    with torch.no_grad():
        expected = hf.get_image_features(x)
        query = model.query_output(model.encode_image(x))
        soft = model.language_inputs(query)
        hf_ids = torch.cat([torch.full((1, 32), hf.config.image_token_index), ids], dim=1)
        logits = hf(pixel_values=x, input_ids=hf_ids).logits
        got = model.language_model(torch.cat([soft, model.language_model.embed_tokens(ids)], 1), torch.ones(1, 36))
    torch.testing.assert_close(query, expected.qformer_outputs.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(soft, expected.pooler_output, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, logits, atol=1e-4, rtol=1e-4)
