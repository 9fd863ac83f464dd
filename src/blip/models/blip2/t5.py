"""T5 / Flan-T5: the encoder-decoder language model of BLIP-2's T5 variants, equal to transformers'
`T5ForConditionalGeneration` (same parameter names, so its state dict loads as is).

Pre-norm blocks with an RMS norm (no mean, no bias, variance in fp32), attention without the 1/sqrt(d) scaling
(T5 folds it into the initialisation) and with a learned relative position bias: block 0 of each stack holds a
`[buckets, heads]` table, its bias is added to every layer's self-attention scores (bidirectional buckets in the
encoder, causal ones in the decoder, positions counted from the start of the decoded sequence); the cross-attention
has no position bias. The feed-forward is ReLU (`wi`, `wo`) or gated (`wi_0`, `wi_1`, `wo`; Flan-T5: tanh-GELU).

Generation drives four calls: `encode` the source embeddings once, project every decoder layer's cross-attention
keys/values once per source (`cross_kv`), then `decode` steps with a `KVCache`. Decoder rows are grouped per source
(rows = S * k, row r reads source r // k), so beams and samples of one source share a single copy of its keys/values.

Mixed precision as transformers does it: the norms compute the variance in fp32 and cast back to the weight dtype;
loaded in float16 (`to_dtype`), the `wo` projections stay in fp32 (T5's `_keep_in_fp32_modules`), which makes the
residual stream fp32 from the first feed-forward on; float16 hidden states are clamped below the float16 maximum after
every sub-layer (transformers' fp16 guard).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blip.blip2_config import T5Config
from blip.models.bert import CrossKV, KVCache, _split_heads
from blip.models.kernels import Linear


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' `gelu_new`: the tanh approximation, written out (its rounding differs from F.gelu's)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' guard for float16: clamp to +-max, or +-(max - 1000) once an inf appeared."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


def relative_position_bucket(
    relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bucket of each `key - query` distance: exact for small distances, log-spaced up to `max_distance`, the last
    bucket beyond. Bidirectional buckets spend half the buckets on keys after the query; causal ones ignore them."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = -torch.min(relative, torch.zeros_like(relative))
    exact = num_buckets // 2
    # Same float operations, in the same order, as the reference: the buckets must match at every boundary.
    log_scaled = torch.log(distance.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    large = torch.clamp(exact + log_scaled.long(), max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


def _additive(allowed: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The bias where attention is allowed, the dtype's minimum where not (transformers' SDPA mask)."""
    return torch.where(allowed, bias, torch.finfo(bias.dtype).min)


def _merge_heads(y: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = y.shape
    return y.transpose(1, 2).reshape(batch, length, heads * dim)  # (B, T, H*d)


def _attend_grouped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """Unscaled attention of `[R, H, T, d]` queries against `S` shared sources `[S, H, L, d]`, R = S * k."""
    rows, heads, length, dim = q.shape
    sources = k.shape[0]
    groups = rows // sources
    if groups * sources != rows:
        raise ValueError(f"{rows} decoder rows cannot be grouped over {sources} sources")
    if mask is not None:  # (S, 1, 1, L) -> additive, as transformers adds a zero position bias and the mask
        mask = _additive(mask, torch.zeros((), dtype=q.dtype, device=q.device))
    if groups > 1:  # (S*k, H, T, d) -> (S, H, k*T, d): the k rows of one source become one longer query block
        q = q.view(sources, groups, heads, length, dim).transpose(1, 2).reshape(sources, heads, groups * length, dim)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=1.0)
    if groups > 1:
        y = y.view(sources, heads, groups, length, dim).transpose(1, 2).reshape(rows, heads, length, dim)
    return y


class T5LayerNorm(nn.Module):
    """RMS norm: x / sqrt(mean(x^2) + eps) * weight, the mean in fp32, cast back to a half-precision weight's dtype."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool = False):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout_rate
        inner = cfg.num_heads * cfg.d_kv
        self.q = Linear(cfg.d_model, inner, bias=False)
        self.k = Linear(cfg.d_model, inner, bias=False)
        self.v = Linear(cfg.d_model, inner, bias=False)
        self.o = Linear(inner, cfg.d_model, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split_heads(self.k(x), self.num_heads), _split_heads(self.v(x), self.num_heads)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """Self-attention; `mask` is additive (position bias + masking), `[1 or B, H, T, K]`."""
        q = _split_heads(self.q(x), self.num_heads)
        k, v = self.project_kv(x)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout, scale=1.0)
        return self.o(_merge_heads(y))

    def forward_cross(self, x: torch.Tensor, cross: CrossKV, layer: int) -> torch.Tensor:
        q = _split_heads(self.q(x), self.num_heads)
        dropout = self.dropout if self.training else 0.0
        y = _attend_grouped(q, cross.keys[layer], cross.values[layer], cross.mask, dropout)
        return self.o(_merge_heads(y))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        return x + self.dropout(self.SelfAttention(self.layer_norm(x), mask, cache, layer))


class T5LayerCrossAttention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, cross: CrossKV, layer: int) -> torch.Tensor:
        return x + self.dropout(self.EncDecAttention.forward_cross(self.layer_norm(x), cross, layer))


class T5DenseActDense(nn.Module):
    """wo(act(wi(x))); `wo` may be kept in fp32 under a float16 model, so its input is cast to its dtype."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.act = ACTIVATIONS[cfg.dense_act_fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.act(self.wi(x)))
        return self.wo(h.to(self.wo.weight.dtype))


class T5DenseGatedActDense(nn.Module):
    """wo(act(wi_0(x)) * wi_1(x)): T5 v1.1 / Flan-T5."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.act = ACTIVATIONS[cfg.dense_act_fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg) if cfg.is_gated_act else T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    """Encoder block: layer = [self-attention, FF]; decoder block: [self-attention, cross-attention, FF]."""

    def __init__(self, cfg: T5Config, decoder: bool, relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, relative_bias)])
        if decoder:
            self.layer.append(T5LayerCrossAttention(cfg))
        self.layer.append(T5LayerFF(cfg))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cross: CrossKV | None = None,
        cache: KVCache | None = None,
        index: int = 0,
    ) -> torch.Tensor:
        x = _clamp_fp16(self.layer[0](x, mask, cache, index))
        if cross is not None:
            x = _clamp_fp16(self.layer[1](x, cross, index))
        return _clamp_fp16(self.layer[-1](x))


class T5Stack(nn.Module):
    """The blocks of the encoder or the decoder; `embed_tokens` is the model's `shared` embedding."""

    def __init__(self, cfg: T5Config, decoder: bool, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.is_decoder = decoder
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        layers = cfg.decoder_layers if decoder else cfg.num_layers
        self.block = nn.ModuleList(T5Block(cfg, decoder, relative_bias=i == 0) for i in range(layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def position_bias(self, queries: int, keys: int, start: int = 0) -> torch.Tensor:
        """`[1, H, queries, keys]` position bias of queries at `start, start + 1, ...` over keys at 0, 1, ..."""
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        device = table.weight.device
        query_pos = torch.arange(queries, device=device)[:, None] + start
        key_pos = torch.arange(keys, device=device)[None, :]
        buckets = relative_position_bucket(
            key_pos - query_pos, not self.is_decoder, self.num_buckets, self.max_distance
        )
        return table(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, K)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cross: CrossKV | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = self.dropout(x)
        for i, block in enumerate(self.block):
            x = block(x, mask, cross, cache, i)
        return self.dropout(self.final_layer_norm(x))


class T5ForConditionalGeneration(nn.Module):
    """Source embeddings `[S, L, D]` + decoder ids `[R, t]` -> next-token logits `[R, t, V]`."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # The same embedding under three names, as transformers' state dict lists it (tied in every T5).
        self.encoder = T5Stack(cfg, decoder=False, embed_tokens=self.shared)
        self.decoder = T5Stack(cfg, decoder=True, embed_tokens=self.shared)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share `lm_head.weight` with `shared.weight` when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def to_dtype(self, dtype: torch.dtype) -> T5ForConditionalGeneration:
        """Cast as transformers' `from_pretrained(dtype=...)` does: every parameter, except that for float16 the
        feed-forward output projections `wo` are left in (or brought to) float32 without a float16 round trip (T5's
        `_keep_in_fp32_modules`; transformers does not apply it to bfloat16)."""
        keep = set()
        if dtype == torch.float16:
            keep = {id(m.wo.weight) for m in self.modules() if isinstance(m, T5DenseActDense | T5DenseGatedActDense)}
        for param in self.parameters():
            param.data = param.data.to(torch.float32 if id(param) in keep else dtype)
        return self

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.shared(input_ids)  # (B, T, D)

    def new_cache(self, capacity: int) -> KVCache:
        """An empty decoder self-attention cache for `capacity` positions."""
        return KVCache(self.config.decoder_layers, capacity)

    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states `[S, L, D]` of source embeddings `[S, L, D]`; `attention_mask` `[S, L]`, 1 = token."""
        length = inputs_embeds.shape[1]
        mask = self.encoder.position_bias(length, length)  # (1, H, L, L)
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = _additive(attention_mask[:, None, None, :].bool(), mask)  # (S, H, L, L)
        return self.encoder(inputs_embeds, mask)

    def cross_kv(self, states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CrossKV:
        """Project encoder states `[S, L, D]` to every decoder layer's cross-attention keys/values once."""
        keys, values = [], []
        for block in self.decoder.block:
            k, v = block.layer[1].EncDecAttention.project_kv(states)
            keys.append(k.contiguous())
            values.append(v.contiguous())
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask[:, None, None, :].bool()  # (S, 1, 1, L)
        return CrossKV(keys, values, mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        cross: CrossKV,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits `[R, t, V]` (`[R, 1, V]` with `last_only`) of decoder ids `[R, t]` that continue `cache`'s
        positions; rows are grouped over `cross`'s sources (R = S * k)."""
        start = cache.length if cache is not None else 0
        steps = decoder_input_ids.shape[1]
        mask = self.decoder.position_bias(steps, start + steps, start)  # (1, H, t, start + t)
        if steps > 1:
            query_pos = torch.arange(steps, device=mask.device)[:, None] + start
            mask = _additive(torch.arange(start + steps, device=mask.device)[None, :] <= query_pos, mask)
        x = self.decoder(self.embed_tokens(decoder_input_ids), mask, cross, cache)
        if cache is not None:
            cache.advance(steps)
        if last_only:
            x = x[:, -1:]
        if self.config.scales_outputs:
            x = x * self.config.d_model**-0.5
        return self.lm_head(x)  # (R, t, V)

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, decoder_input_ids: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced logits `[S, t, V]`: source embeddings `[S, L, D]`, decoder ids `[S, t]`."""
        states = self.encode(inputs_embeds, attention_mask)
        return self.decode(decoder_input_ids, self.cross_kv(states, attention_mask))


# Keys transformers' T5 state dict may carry beyond ours: an EncDecAttention position table old checkpoints saved
# (transformers ignores it).
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def hf_t5_state_dict(
    state_dict: dict[str, torch.Tensor], config: T5Config, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], T5Config]:
    """Our model's state dict and config from the tensors of a transformers T5 under `prefix` (e.g.
    "language_model."), resolved as transformers' loading resolves them.

    A saved folder holds the embedding once (transformers writes `shared.weight` and drops the tied
    `encoder.embed_tokens.weight` / `decoder.embed_tokens.weight` / `lm_head.weight`; older files may hold any of
    them): every alias is filled from the one present. The head is untied exactly when the tensors hold an
    `lm_head.weight` that differs from the embedding (what transformers 5 does, whatever the config says about
    tying); otherwise it is tied. The output scaling stays the config's.
    """
    ours = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    for key in _IGNORED:
        ours.pop(key, None)
    embedding = next((ours[key] for key in _EMBEDDINGS if key in ours), None)
    if embedding is None:
        embedding = ours.get("lm_head.weight")
    if embedding is None:
        raise KeyError(f"no {prefix}shared.weight (nor any tied alias of it) among the weights")
    for key in _EMBEDDINGS:
        if key in ours and ours[key] is not embedding and not torch.equal(ours[key], embedding):
            raise ValueError(f"{prefix}{key} differs from the other token embeddings; T5 shares one embedding")
        ours[key] = embedding
    head = ours.get("lm_head.weight")
    untied = head is not None and head is not embedding and not torch.equal(head, embedding)
    scale = config.scales_outputs
    config = config.replace(tie_word_embeddings=not untied, scale_decoder_outputs=scale)
    ours["lm_head.weight"] = head if untied else embedding
    return ours, config
