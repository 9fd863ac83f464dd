"""T5 / Flan-T5 against transformers' `T5ForConditionalGeneration` with random weights: state-dict layout, encoder
states, teacher-forced logits, cached grouped decoding, half precision, the tied/untied head, the config mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip.blip2_config import T5_ACTIVATIONS, T5Config
from blip.config import ConfigError
from blip.models.bert import KVCache
from blip.models.blip2.t5 import (
    ACTIVATIONS,
    T5ForConditionalGeneration,
    _clamp_fp16,
    hf_t5_state_dict,
    relative_position_bucket,
)

transformers = pytest.importorskip("transformers")

# Tiny configurations in transformers' spelling; `untie` gives the HF model a separate random lm_head.
CONFIGS = {
    # original T5: ReLU, tied + scaled head, 8 buckets, more decoder than encoder layers
    "t5-relu": dict(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="relu",
    ),
    # Flan-T5 style: gated tanh-GELU, untied + unscaled head, heads * d_kv != d_model, 32 buckets up to 128
    "flan": dict(
        vocab_size=80, d_model=24, d_kv=10, d_ff=40, num_layers=3, num_decoder_layers=2, num_heads=3,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, untie=True,
    ),
    # gated SiLU, one layer each, 16 buckets with a max distance the sequences exceed (the last bucket)
    "silu-short": dict(
        vocab_size=50, d_model=32, d_kv=16, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2,
        relative_attention_num_buckets=16, relative_attention_max_distance=12, feed_forward_proj="gated-silu",
        layer_norm_epsilon=1e-5,
    ),
}  # fmt: skip
SOURCE_LEN, TARGET_LEN = 13, 18  # past the exact buckets of every config, and past "silu-short"'s max distance
FLAN_T5_XL = dict(  # the text_config of Salesforce/blip2-flan-t5-xl
    model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
    eos_token_id=1, decoder_start_token_id=0, initializer_factor=1.0, is_encoder_decoder=True, use_cache=True,
)  # fmt: skip


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random with real spread: norms around 1, position tables and embeddings wide."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "layer_norm" in name:
            param.copy_(1.0 + 0.2 * noise)
        elif "relative_attention_bias" in name:
            param.copy_(noise)
        elif name in ("shared.weight", "lm_head.weight"):
            param.copy_(noise)
        else:
            param.copy_(1.5 * noise / param.shape[-1] ** 0.5)


def build_hf(name: str, seed: int = 0):
    spec = dict(CONFIGS[name])
    untie = spec.pop("untie", False)
    torch.manual_seed(seed)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**spec)).eval()
    if untie:  # transformers 5 always ties at construction; a loaded Flan-T5 has its own lm_head
        hf.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf.shared.weight))
    randomize(hf, seed)
    return hf


_MODELS: dict[str, tuple] = {}


def models(name: str):
    """(transformers model, ours with its weights), built once per config."""
    if name not in _MODELS:
        hf = build_hf(name, seed=len(name))
        cfg = T5Config.from_hf_dict(dict(CONFIGS[name])).validate()
        ours = T5ForConditionalGeneration(cfg).eval()
        ours.load_state_dict(hf.state_dict(), strict=True)
        _MODELS[name] = hf, ours
    return _MODELS[name]


def source(cfg: T5Config, sources: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random source embeddings `[S, L, D]` and a mask padding some rows on the right, one on the left."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(sources, SOURCE_LEN, cfg.d_model, generator=generator)
    mask = torch.ones(sources, SOURCE_LEN, dtype=torch.long)
    mask[1, SOURCE_LEN - 5 :] = 0
    if sources > 2:
        mask[2, :4] = 0
    return embeds, mask


def target(cfg: T5Config, rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(0, cfg.vocab_size, (rows, TARGET_LEN), generator=generator)
    ids[:, 0] = cfg.decoder_start_token_id
    return ids


# --- structure and layout -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_keys_and_tying_match_transformers(name):
    hf, ours = models(name)
    hf_sd, our_sd = hf.state_dict(), ours.state_dict()
    assert list(our_sd) == list(hf_sd)
    assert all(our_sd[k].shape == hf_sd[k].shape for k in hf_sd)
    assert {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"} <= set(
        our_sd
    )
    # the relative position table lives in block 0 of each stack only
    tables = [k for k in our_sd if "relative_attention_bias" in k]
    assert tables == [
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ]
    assert ours.encoder.embed_tokens.weight is ours.shared.weight is ours.decoder.embed_tokens.weight
    tied = not CONFIGS[name].get("untie", False)
    assert (ours.lm_head.weight is ours.shared.weight) == tied
    assert ours.config.tie_word_embeddings == tied
    assert ours.config.scales_outputs == hf.config.scale_decoder_outputs == tied
    gated = CONFIGS[name]["feed_forward_proj"].startswith("gated")
    ffn = "encoder.block.0.layer.1.DenseReluDense."
    assert (ffn + "wi_0.weight" in our_sd) == gated and (ffn + "wi.weight" in our_sd) == (not gated)


def test_relative_position_buckets_match_transformers():
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    relative = torch.arange(-400, 401)[None, :] - torch.arange(0, 3)[:, None]
    for buckets, distance in ((8, 20), (32, 128), (16, 12), (5, 9), (33, 100)):
        for bidirectional in (True, False):
            ours = relative_position_bucket(relative, bidirectional, buckets, distance)
            assert torch.equal(ours, bucket(relative, bidirectional, buckets, distance))
            assert int(ours.max()) == buckets - 1 - (bidirectional and buckets % 2)


def test_activations_match_transformers():
    from transformers.activations import ACT2FN

    assert set(ACTIVATIONS) == T5_ACTIVATIONS
    x = torch.randn(1000) * 4
    for name, fn in ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), ACT2FN[name](x), atol=0, rtol=0, msg=name)
        torch.testing.assert_close(fn(x.bfloat16()), ACT2FN[name](x.bfloat16()), atol=0, rtol=0, msg=name)


def test_fp16_clamp_as_transformers():
    x = torch.tensor([1.0, -2.0, 70000.0], dtype=torch.float16)  # 70000 overflows to inf in float16
    assert _clamp_fp16(x).tolist() == [1.0, -2.0, 64512.0]  # max - 1000, rounded to float16
    assert _clamp_fp16(torch.tensor([65504.0, -65504.0], dtype=torch.float16)).tolist() == [65504.0, -65504.0]
    bf = torch.tensor([1e30], dtype=torch.bfloat16)
    assert _clamp_fp16(bf) is bf


# --- numerics (fp32) ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_encoder_states_match_transformers(name):
    hf, ours = models(name)
    embeds, mask = source(ours.config)
    expected = hf.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours.encode(embeds, mask), expected, atol=1e-4, rtol=1e-4)
    # without padding: no mask, and a mask of ones, are the same
    full = hf.encoder(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(ours.encode(embeds, None), full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.encode(embeds, torch.ones_like(mask)), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_teacher_forced_logits_match_transformers(name):
    hf, ours = models(name)
    embeds, mask = source(ours.config)
    ids = target(ours.config, 3)
    expected = hf(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ids).logits
    logits = ours(embeds, mask, ids)
    assert logits.shape == (3, TARGET_LEN, ours.config.vocab_size)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert expected.std() > 0.5  # not degenerate
    # the embedding the generation loop uses is the shared one
    torch.testing.assert_close(ours.embed_tokens(ids), hf.shared(ids), atol=0, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_cached_grouped_decoding_equals_full_logits(name):
    """S sources x k rows, cached steps of several sizes, rows reordered (beam style) and a source leaving: every
    step's logits equal transformers' teacher-forced logits of the same row (its source repeated per row)."""
    hf, ours = models(name)
    cfg = ours.config
    sources, k = 3, 2
    embeds, mask = source(cfg, sources, seed=1)
    ids = target(cfg, sources * k, seed=1)
    rows_source = torch.arange(sources).repeat_interleave(k)
    reference = hf(
        inputs_embeds=embeds[rows_source], attention_mask=mask[rows_source], decoder_input_ids=ids
    ).logits  # (R, T, V)

    states = ours.encode(embeds, mask)
    cross = ours.cross_kv(states, mask)
    assert len(cross.keys) == cfg.decoder_layers
    assert cross.keys[0].shape == (sources, cfg.num_heads, SOURCE_LEN, cfg.d_kv)
    assert cross.mask.shape == (sources, 1, 1, SOURCE_LEN) and cross.mask.dtype == torch.bool
    cache = KVCache(cfg.decoder_layers, capacity=TARGET_LEN)
    rows = torch.arange(sources * k)  # which reference row each of our rows is
    position = 0
    for step, size in enumerate((3, 1, 2, 1, 1, 4, 1, 1, 1, 1, 1, 1)):
        if step == 4:  # beam-style reordering inside each source: swap the two rows of sources 0 and 2
            order = torch.tensor([1, 0, 2, 3, 5, 4])
            cache.select(order)
            rows = rows[order]
        if step == 7:  # source 1 leaves
            cross = cross.select(torch.tensor([0, 2]))
            keep = torch.tensor([0, 1, 4, 5])
            cache.select(keep)
            rows = rows[keep]
        chunk = ids[rows, position : position + size]
        last_only = step % 2 == 1
        logits = ours.decode(chunk, cross, cache, last_only=last_only)
        expected = reference[rows, position : position + size]
        if last_only:
            expected = expected[:, -1:]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4, msg=f"step {step}")
        position += size
        assert cache.length == position
    assert position == TARGET_LEN


@torch.no_grad()
def test_decode_without_cache_and_single_row_sources():
    hf, ours = models("flan")
    embeds, mask = source(ours.config, 2)
    ids = target(ours.config, 2)
    cross = ours.cross_kv(ours.encode(embeds, mask), mask)
    expected = hf(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ids).logits
    torch.testing.assert_close(ours.decode(ids, cross), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.decode(ids, cross, last_only=True), expected[:, -1:], atol=1e-4, rtol=1e-4)
    # no padding anywhere: the cross mask is dropped
    assert ours.cross_kv(ours.encode(embeds), torch.ones_like(mask)).mask is None
    with pytest.raises(ValueError, match="grouped"):
        ours.decode(target(ours.config, 3)[:, :2], cross)


def test_training_mode_backward_reaches_every_parameter():
    _, trained = models("flan")
    ours = T5ForConditionalGeneration(trained.config)
    ours.load_state_dict(trained.state_dict())
    ours.train()
    embeds, mask = source(ours.config)
    ids = target(ours.config, 3)
    torch.manual_seed(0)
    first = ours(embeds, mask, ids)
    assert not torch.allclose(first, ours(embeds, mask, ids))  # dropout (rate 0.1, transformers' default) is on
    torch.nn.functional.cross_entropy(first.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    for name, param in ours.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# --- saved folders, the head, half precision -------------------------------------------------------------------


def save_hf(hf, folder: Path) -> tuple[dict, dict]:
    hf.save_pretrained(folder)
    return load_file(folder / "model.safetensors"), json.loads((folder / "config.json").read_text())


def from_folder(tensors: dict, config: dict, prefix: str = "") -> T5ForConditionalGeneration:
    cfg = T5Config.from_hf_dict(config).validate()
    state, cfg = hf_t5_state_dict(tensors, cfg, prefix)
    ours = T5ForConditionalGeneration(cfg).eval()
    ours.load_state_dict(state, strict=True)
    return ours


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_saved_folder_loads(name, tmp_path):
    """transformers writes the embedding once (`shared.weight`, plus `lm_head.weight` when untied) and
    `tie_word_embeddings: true` with `scale_decoder_outputs` even for Flan-T5: both resolve to the same model."""
    hf, _ = models(name)
    tensors, config = save_hf(hf, tmp_path)
    untied = CONFIGS[name].get("untie", False)
    embedding_keys = {k for k in tensors if "embed" in k or k in ("shared.weight", "lm_head.weight")}
    assert embedding_keys == ({"shared.weight", "lm_head.weight"} if untied else {"shared.weight"})
    assert config["tie_word_embeddings"] is True and config["scale_decoder_outputs"] is (not untied)
    ours = from_folder(tensors, config)
    assert ours.config.tie_word_embeddings == (not untied) and ours.config.scales_outputs == (not untied)
    embeds, mask = source(ours.config)
    ids = target(ours.config, 3)
    expected = hf(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ids).logits
    torch.testing.assert_close(ours(embeds, mask, ids), expected, atol=1e-4, rtol=1e-4)
    # the same tensors under BLIP-2's prefix, with every alias present (older files), load the same way
    prefixed = {f"language_model.{k}": v for k, v in hf.state_dict().items()}
    prefixed["language_model.decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(
        ours.config.relative_attention_num_buckets, ours.config.num_heads
    )  # old files carry it; transformers ignores it
    prefixed["qformer.layernorm.weight"] = torch.ones(3)
    again = from_folder(prefixed, CONFIGS[name], prefix="language_model.")
    torch.testing.assert_close(again(embeds, mask, ids), expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_head_resolution_follows_transformers(tmp_path):
    """The other two head combinations transformers 5 can produce: a Flan config whose weights hold no separate
    lm_head (tied, unscaled), and a T5 config whose weights do (untied, scaled)."""
    spec = {k: v for k, v in CONFIGS["flan"].items() if k != "untie"}
    cases = {"tied-unscaled": (spec, False), "untied-scaled": (spec | {"tie_word_embeddings": True}, True)}
    for case, (config_dict, untie) in cases.items():
        hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**config_dict)).eval()
        if untie:
            hf.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf.shared.weight))
        randomize(hf, seed=7)
        folder = tmp_path / case
        save_hf(hf, folder)
        hf = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
        assert (hf.lm_head.weight is hf.shared.weight) == (not untie), case
        tensors, config = load_file(folder / "model.safetensors"), json.loads((folder / "config.json").read_text())
        for config_source in (config, config_dict):  # transformers' saved config, and the one it was built from
            ours = from_folder(tensors, config_source)
            assert ours.config.tie_word_embeddings == (not untie), case
            assert ours.config.scales_outputs == hf.config.scale_decoder_outputs == untie, case
            embeds, mask = source(ours.config)
            ids = target(ours.config, 3)
            expected = hf(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ids).logits
            torch.testing.assert_close(ours(embeds, mask, ids), expected, atol=1e-4, rtol=1e-4, msg=case)


def test_state_dict_errors():
    cfg = T5Config.from_hf_dict(CONFIGS["t5-relu"])
    with pytest.raises(KeyError, match="shared.weight"):
        hf_t5_state_dict({"encoder.final_layer_norm.weight": torch.ones(32)}, cfg)
    with pytest.raises(ValueError, match="encoder.embed_tokens.weight differs"):
        hf_t5_state_dict({"shared.weight": torch.zeros(4, 2), "encoder.embed_tokens.weight": torch.ones(4, 2)}, cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["flan", "t5-relu"])
@torch.no_grad()
def test_half_precision_matches_transformers(name, dtype, tmp_path):
    """transformers loaded in `dtype` versus ours cast with `to_dtype`: in float16 both keep `wo` in fp32."""
    hf32, _ = models(name)
    tensors, config = save_hf(hf32, tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).eval()
    ours = from_folder(tensors, config).to_dtype(dtype)
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    keep = torch.float32 if dtype == torch.float16 else dtype
    assert hf.state_dict()[wo].dtype == ours.state_dict()[wo].dtype == keep
    assert {p.dtype for n, p in ours.named_parameters() if ".wo." not in n} == {dtype}
    embeds, mask = source(ours.config)
    embeds = embeds.to(dtype)
    ids = target(ours.config, 3)
    states = ours.encode(embeds, mask)
    expected_states = hf.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    assert states.dtype == expected_states.dtype == dtype
    # same operations in the same order: equal up to rounding (a float16 round trip of `wo` fails this)
    torch.testing.assert_close(states, expected_states, atol=1e-2, rtol=1e-2)
    logits = ours(embeds, mask, ids)
    expected = hf(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ids).logits
    assert logits.dtype == expected.dtype == dtype
    torch.testing.assert_close(logits.float(), expected.float(), atol=1e-2, rtol=1e-2)
    # step by step with the cache, as transformers' generate runs it (its cache, the encoder output reused)
    cross = ours.cross_kv(states, mask)
    cache = KVCache(ours.config.decoder_layers, TARGET_LEN)
    steps = torch.cat([ours.decode(ids[:, i : i + 1], cross, cache) for i in range(TARGET_LEN)], 1)
    encoder_outputs, hf_cache, hf_steps = (expected_states,), None, []
    for i in range(TARGET_LEN):
        out = hf(
            encoder_outputs=encoder_outputs,
            attention_mask=mask,
            decoder_input_ids=ids[:, i : i + 1],
            cache=hf_cache,
            use_cache=True,
        )
        hf_cache = out.cache
        hf_steps.append(out.logits)
    torch.testing.assert_close(steps.float(), torch.cat(hf_steps, 1).float(), atol=1e-2, rtol=1e-2)


# --- config ----------------------------------------------------------------------------------------------------


def test_flan_t5_xl_config():
    cfg = T5Config.from_hf_dict(FLAN_T5_XL).validate()
    assert (cfg.dense_act_fn, cfg.is_gated_act, cfg.decoder_layers) == ("gelu_new", True, 24)
    assert cfg.tie_word_embeddings is False and cfg.scales_outputs is False
    hf = transformers.T5Config(**cfg.to_hf_dict())
    assert (hf.dense_act_fn, hf.is_gated_act, hf.scale_decoder_outputs, hf.num_decoder_layers) == (
        "gelu_new",
        True,
        False,
        24,
    )
    # defaults: a T5 config that states nothing is t5-small's shape, tied and scaled
    small = T5Config.from_hf_dict({})
    assert small.tie_word_embeddings and small.scales_outputs and small.decoder_layers == 6
    assert small.dense_act_fn == "relu" and not small.is_gated_act


@pytest.mark.parametrize(
    "data",
    [
        FLAN_T5_XL,
        {},
        {"num_layers": 3, "feed_forward_proj": "gated-silu", "tie_word_embeddings": True},
        {"feed_forward_proj": "gelu", "num_decoder_layers": 2, "eos_token_id": [1]},
        # transformers 5 writes these: tie always true, the scaling and the activation it resolved
        {"tie_word_embeddings": True, "scale_decoder_outputs": False, "feed_forward_proj": "gated-gelu"},
        {"feed_forward_proj": "gated-gelu", "dense_act_fn": "relu", "is_gated_act": False},
    ],
)
def test_config_round_trips_and_transformers_reads_it(data):
    cfg = T5Config.from_hf_dict(data).validate()
    assert T5Config.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert T5Config.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg
    reference = transformers.T5Config(**data)  # what transformers makes of the original
    for hf in (reference, transformers.T5Config(**cfg.to_hf_dict())):
        assert hf.dense_act_fn == cfg.dense_act_fn and hf.is_gated_act == cfg.is_gated_act
        assert hf.scale_decoder_outputs == cfg.scales_outputs
        assert hf.num_decoder_layers == cfg.decoder_layers
        for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "layer_norm_epsilon"):
            assert getattr(hf, field) == getattr(cfg, field), field
        for field in ("relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate"):
            assert getattr(hf, field) == getattr(cfg, field), field
    blip2 = transformers.Blip2Config(text_config=cfg.to_hf_dict())
    assert blip2.text_config.model_type == "t5" and blip2.text_config.scale_decoder_outputs == cfg.scales_outputs


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_heads": 0}, "num_heads"),
        ({"d_kv": 0}, "d_kv"),
        ({"num_heads": 256, "d_kv": 256}, "num_heads"),
        ({"d_model": 1.5}, "d_model"),
        ({"d_ff": -1}, "d_ff"),
        ({"num_layers": True}, "num_layers"),
        ({"num_decoder_layers": 0}, "num_decoder_layers"),
        ({"relative_attention_num_buckets": 3}, "relative_attention_num_buckets"),
        ({"relative_attention_max_distance": 16}, "relative_attention_max_distance"),  # = 32 // 2 exact buckets
        ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"feed_forward_proj": "gated-swiglu"}, "feed_forward_proj"),
        ({"feed_forward_proj": "fancy-gelu"}, "feed_forward_proj"),
        ({"feed_forward_proj": "gated-gelu-x"}, "feed_forward_proj"),
        ({"feed_forward_proj": 3}, "feed_forward_proj"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
        ({"eos_token_id": 32128}, "eos_token_id"),
        ({"pad_token_id": None}, "pad_token_id"),
        ({"decoder_start_token_id": -1}, "decoder_start_token_id"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_validate_names_the_field(change, field):
    with pytest.raises(ConfigError, match=rf"^text_config\.{field}\b"):
        T5Config().replace(**change).validate()


def test_from_hf_dict_errors():
    with pytest.raises(ConfigError, match="text_config is not a JSON object"):
        T5Config.from_hf_dict([1])
    with pytest.raises(ConfigError, match=r"text_config\.eos_token_id"):
        T5Config.from_hf_dict({"eos_token_id": [1, 2]})
    with pytest.raises(ConfigError, match=r"text_config\.feed_forward_proj"):
        T5Config.from_hf_dict({"feed_forward_proj": "nonsense"}).validate()
