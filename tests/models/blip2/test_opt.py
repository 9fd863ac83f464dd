"""The BLIP-2 OPT language model equals transformers' `OPTForCausalLM` (random weights): teacher-forced logits,
left-padded batches, cached decoding with beam reordering and rows leaving, bf16/fp16, and the config mapping."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from blip.blip2_config import OPT_ACTIVATIONS, OptConfig
from blip.config import ConfigError
from blip.models.blip2.opt import ACTIVATIONS, OptForCausalLM

transformers = pytest.importorskip("transformers")

# Tiny configs covering every structural switch: pre-/post-LN, the 350m-style 512 <-> 1024 projections, no biases,
# no LayerNorm affine, no final LayerNorm, an untied head, other activations.
CONFIGS = {
    "pre_ln": dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, ffn_dim=40, num_attention_heads=4),
    "post_ln_proj": dict(
        vocab_size=67,
        hidden_size=48,
        num_hidden_layers=3,
        ffn_dim=64,
        num_attention_heads=3,
        max_position_embeddings=40,
        word_embed_proj_dim=24,
        do_layer_norm_before=False,
    ),
    "no_bias_gelu": dict(
        vocab_size=31,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=24,
        num_attention_heads=2,
        max_position_embeddings=30,
        enable_bias=False,
        activation_function="gelu",
        pad_token_id=0,
    ),
    "untied_no_final_ln": dict(
        vocab_size=45,
        hidden_size=24,
        num_hidden_layers=2,
        ffn_dim=56,
        num_attention_heads=6,
        max_position_embeddings=32,
        word_embed_proj_dim=20,
        _remove_final_layer_norm=True,
        tie_word_embeddings=False,
        layer_norm_elementwise_affine=False,
        activation_function="gelu_new",
    ),
}


def _hf_model(hf_dict: dict, seed: int):
    hf_config = transformers.OPTConfig(**hf_dict)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(hf_config).eval()
    with torch.no_grad():  # every parameter random, LayerNorm weights around 1, positions and biases included
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(transformers model, ours with its weights loaded strictly, config name)."""
    hf_dict = {
        **CONFIGS[request.param],
        "max_position_embeddings": CONFIGS[request.param].get("max_position_embeddings", 24),
    }
    hf = _hf_model(hf_dict, seed=len(request.param))
    ours = OptForCausalLM(OptConfig.from_hf_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours, request.param


def _embeds(ours: OptForCausalLM, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, ours.config.word_embed_dim, generator=gen)


def test_state_dict_names_and_shapes_equal_transformers(pair):
    hf, ours, name = pair
    theirs, mine = hf.state_dict(), ours.state_dict()
    assert set(mine) == set(theirs)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    tied = ours.lm_head.weight is ours.model.decoder.embed_tokens.weight
    assert tied == CONFIGS[name].get("tie_word_embeddings", True)
    assert ("model.decoder.final_layer_norm.weight" in mine) == (name in ("pre_ln", "no_bias_gelu"))
    assert ("model.decoder.project_in.weight" in mine) == ("word_embed_proj_dim" in CONFIGS[name])


@torch.no_grad()
def test_teacher_forced_logits_equal_transformers(pair):
    hf, ours, _ = pair
    embeds = _embeds(ours, 3, 11)
    mask = torch.ones(3, 11, dtype=torch.long)
    expected = hf(inputs_embeds=embeds, attention_mask=mask).logits
    logits = ours(embeds, mask)
    assert logits.shape == expected.shape and expected.std() > 0.5
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours(embeds, mask, last_only=True), expected[:, -1:], atol=1e-4, rtol=1e-4)
    # token ids through embed_tokens, as transformers embeds them
    ids = torch.randint(0, ours.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    ones = torch.ones(2, 7)
    torch.testing.assert_close(
        ours(ours.embed_tokens(ids), ones), hf(input_ids=ids, attention_mask=ones).logits, atol=1e-4, rtol=1e-4
    )


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(pair):
    hf, ours, _ = pair
    lengths = [9, 4, 1, 6]
    embeds = _embeds(ours, len(lengths), 9, seed=2)
    mask = torch.zeros(len(lengths), 9, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, 9 - n :] = 1
        embeds[r, : 9 - n] = 7.0  # padding content must not matter
    logits = ours(embeds, mask)
    assert torch.isfinite(logits).all()
    expected = hf(inputs_embeds=embeds, attention_mask=mask).logits
    last = ours(embeds, mask, last_only=True)
    for r, n in enumerate(lengths):
        alone = ours(embeds[r : r + 1, 9 - n :], mask[r : r + 1, 9 - n :])[0]
        torch.testing.assert_close(logits[r, 9 - n :], alone, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[r, 9 - n :], expected[r, 9 - n :], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(last[r, 0], alone[-1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_cached_decoding_with_reordering_and_rows_leaving_equals_full_sequences(pair):
    """Prefill a left-padded prefix, then one position per step; between steps rows are permuted, duplicated (as
    beams are) and dropped. Every logit row must equal transformers' full-sequence logits of that row's history."""
    hf, ours, _ = pair
    gen = torch.Generator().manual_seed(3)
    width = ours.config.word_embed_dim
    lengths, prefix = [5, 2, 3], 5
    embeds = torch.randn(3, prefix, width, generator=gen)
    mask = torch.zeros(3, prefix, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, prefix - n :] = 1
    cache = ours.new_cache(prefix + 6)
    logits = ours(embeds, mask, cache, last_only=True)  # (B, 1, V)
    # each row's history: its real embeddings and the logits produced at its last position
    history = [([embeds[r, prefix - n :]], [logits[r, 0]]) for r, n in enumerate(lengths)]
    finished = []
    steps = [
        torch.tensor([2, 0, 1]),  # permutation (in place)
        torch.tensor([1, 1, 0]),  # beams: a row duplicated, one dropped (same batch size)
        torch.tensor([2, 0]),  # a row leaves
        torch.tensor([1, 0]),
        None,
        torch.tensor([0]),
    ]
    for select in steps:
        if select is not None:
            kept = set(select.tolist())
            finished += [h for i, h in enumerate(history) if i not in kept]
            history = [([*history[i][0]], [*history[i][1]]) for i in select.tolist()]
            cache.select(select)
            mask = mask[select]
        step = torch.randn(len(history), 1, width, generator=gen)
        mask = torch.cat([mask, torch.ones(len(history), 1, dtype=torch.long)], 1)
        logits = ours(step, mask, cache)
        assert logits.shape == (len(history), 1, ours.config.vocab_size)
        for r, (inputs, outputs) in enumerate(history):
            inputs.append(step[r])
            outputs.append(logits[r, 0])
    assert cache.length == prefix + len(steps)
    for inputs, outputs in finished + history:
        sequence = torch.cat(inputs)[None]
        expected = hf(inputs_embeds=sequence, attention_mask=torch.ones(sequence.shape[:2])).logits[0]
        torch.testing.assert_close(torch.stack(outputs), expected[-len(outputs) :], atol=1e-4, rtol=1e-4)


def test_gradients_reach_the_input_embeddings_as_in_transformers(pair):
    """BLIP-2 trains the Q-Former through the frozen LM: the gradient w.r.t. the input embeddings must match."""
    hf, ours, _ = pair
    embeds = _embeds(ours, 2, 6, seed=5)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    target = torch.randn(2, 6, ours.config.vocab_size, generator=torch.Generator().manual_seed(6))
    grads = []
    for model in (hf, ours):
        x = embeds.clone().requires_grad_()
        logits = model(inputs_embeds=x, attention_mask=mask).logits if model is hf else model(x, mask)
        (logits[:, 2:] * target[:, 2:]).sum().backward()
        grads.append(x.grad[:, 2:])
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)
    assert grads[1].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_is_close_to_transformers(pair, dtype):
    """bf16/fp16 compute in the parameter dtype: as close to transformers' run as their rounding allows, prefill and
    cached (CPU direct-attention path) alike."""
    hf, ours, _ = pair
    embeds, lengths = _embeds(ours, 2, 8, seed=4), [8, 5]
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    exact = hf(inputs_embeds=embeds, attention_mask=mask).logits
    hf_half, ours_half = hf.to(dtype), ours.to(dtype)
    try:
        theirs = hf_half(inputs_embeds=embeds.to(dtype), attention_mask=mask).logits
        logits = ours_half(embeds.to(dtype), mask)
        assert logits.dtype == dtype
        cache = ours_half.new_cache(8)
        stepped = [ours_half(embeds[:, :5].to(dtype), mask[:, :5], cache)]
        for t in range(5, 8):
            stepped.append(ours_half(embeds[:, t : t + 1], mask[:, : t + 1], cache))  # fp32 inputs are cast
        stepped = torch.cat(stepped, 1)
    finally:
        hf.float(), ours.float()
    scale = exact.abs().max() * torch.finfo(dtype).eps  # the logits' size in units of the dtype's rounding
    for r, n in enumerate(lengths):
        real = slice(8 - n, 8)
        ours_error = (logits[r, real].float() - exact[r, real]).abs().max()
        their_error = (theirs[r, real].float() - exact[r, real]).abs().max()
        assert (logits[r, real].float() - theirs[r, real].float()).abs().max() < 8 * scale
        assert ours_error < 1.5 * their_error + 2 * scale
        assert (stepped[r, real].float() - exact[r, real]).abs().max() < 16 * scale


def test_activation_table_matches_transformers():
    from transformers.activations import ACT2FN

    assert set(ACTIVATIONS) == set(OPT_ACTIVATIONS)
    x = torch.linspace(-6, 6, 301)
    for name in OPT_ACTIVATIONS:
        torch.testing.assert_close(ACTIVATIONS[name](x), ACT2FN[name](x), atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("activation", ["quick_gelu", "silu"])
@torch.no_grad()
def test_other_activations_equal_transformers(activation):
    hf = _hf_model({**CONFIGS["pre_ln"], "activation_function": activation, "max_position_embeddings": 16}, seed=5)
    ours = OptForCausalLM(OptConfig.from_hf_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    embeds, mask = _embeds(ours, 2, 6), torch.ones(2, 6)
    torch.testing.assert_close(ours(embeds, mask), hf(inputs_embeds=embeds, attention_mask=mask).logits)


# --- config -------------------------------------------------------------------------------------------------------


def test_defaults_equal_transformers_defaults():
    assert OptConfig.from_hf_dict(transformers.OPTConfig().to_dict()) == OptConfig(word_embed_proj_dim=768)
    assert OptConfig.from_hf_dict({}) == OptConfig()
    assert OptConfig().word_embed_dim == 768 and OptConfig().validate() is not None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_and_to_hf_dict_round_trip_through_transformers(name):
    ours = OptConfig.from_hf_dict(CONFIGS[name])
    assert ours.remove_final_layer_norm == CONFIGS[name].get("_remove_final_layer_norm", False)
    data = ours.to_hf_dict()
    assert data["model_type"] == "opt" and "remove_final_layer_norm" not in data
    hf_config = transformers.OPTConfig.from_dict(data)
    assert OptConfig.from_hf_dict(hf_config.to_dict()) == dataclasses.replace(
        ours, word_embed_proj_dim=ours.word_embed_dim
    )
    assert transformers.AutoConfig.for_model(**data).to_dict() == hf_config.to_dict()
    # the config transformers reads back builds the same model: our weights load strictly and give our logits
    hf_config._attn_implementation = "eager"
    hf = transformers.OPTForCausalLM(hf_config).eval()
    torch.manual_seed(0)
    model = OptForCausalLM(ours).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        hf.load_state_dict(model.state_dict(), strict=True)
        embeds, mask = _embeds(model, 2, 5), torch.ones(2, 5)
        torch.testing.assert_close(model(embeds, mask), hf(inputs_embeds=embeds, attention_mask=mask).logits)


def test_token_ids_given_as_lists_or_null():
    cfg = OptConfig.from_hf_dict({"eos_token_id": [50118, 2], "bos_token_id": None, "pad_token_id": []})
    assert (cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id) == (50118, None, None)
    assert cfg.validate() is cfg
    model = OptForCausalLM(cfg.replace(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=60000))
    assert model.model.decoder.embed_tokens.padding_idx is None
    with pytest.raises(ConfigError, match="text_config.model_type"):
        OptConfig.from_hf_dict({"model_type": "t5"})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(hidden_size=0), "text_config.hidden_size"),
        (dict(vocab_size="50272"), "text_config.vocab_size"),
        (dict(num_hidden_layers=1000), "text_config.num_hidden_layers"),
        (dict(ffn_dim=-1), "text_config.ffn_dim"),
        (dict(max_position_embeddings=0), "text_config.max_position_embeddings"),
        (dict(word_embed_proj_dim=0), "text_config.word_embed_proj_dim"),
        (dict(num_attention_heads=7), "text_config.num_attention_heads"),
        (dict(activation_function="swiglu"), "text_config.activation_function"),
        (dict(do_layer_norm_before="yes"), "text_config.do_layer_norm_before"),
        (dict(remove_final_layer_norm=1), "text_config._remove_final_layer_norm"),
        (dict(eos_token_id=50272), "text_config.eos_token_id"),
        (dict(pad_token_id=-1), "text_config.pad_token_id"),
    ],
)
def test_validate_names_the_field_in_one_line(changes, field):
    with pytest.raises(ConfigError) as error:
        OptConfig().replace(**changes).validate()
    message = str(error.value)
    assert message.startswith(field) and "\n" not in message
    with pytest.raises(ConfigError):
        OptForCausalLM(OptConfig().replace(**changes))


@torch.no_grad()
def test_bad_masks_and_too_many_positions_are_one_line_errors():
    cfg = OptConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, ffn_dim=8, num_attention_heads=2)
    model = OptForCausalLM(cfg.replace(max_position_embeddings=6)).eval()
    with pytest.raises(ValueError, match=r"expected \(1, 4\)"):
        model(torch.randn(1, 4, 8), torch.ones(1, 5))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randn(1, 7, 8), torch.ones(1, 7))
    mask = torch.ones(2, 8)
    mask[:, :2] = 0  # 8 slots but only 6 real tokens per row: positions 0..5 fit, as in transformers
    assert model(torch.randn(2, 8, 8), mask).shape == (2, 8, 20)
