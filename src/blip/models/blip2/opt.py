"""OPT, the decoder-only language model of BLIP-2 (opt-2.7b, opt-6.7b), exact with transformers' `OPTForCausalLM`.

Parameter names follow that class (`model.decoder.layers.{i}.self_attn.q_proj`, ...), so its state dicts load as
they are. The model reads input embeddings (BLIP-2 prepends the projected Q-Former queries to the prompt's token
embeddings) and returns logits; token embedding is a separate method and generation lives elsewhere.

Positions come from the attention mask as transformers computes them (the running count of real tokens, minus one,
plus OPT's offset of 2), so a left-padded row gives the logits of the row alone. Keys/values go to the project's
preallocated `KVCache`, which holds the padding positions too: the mask covers cached and new positions alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from blip.blip2_config import OptConfig
from blip.models.bert import KVCache, _split_heads
from blip.models.kernels import Linear

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2 (fairseq kept rows 0-1 for padding)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "relu6": F.relu6,
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Unscaled attention (the queries come pre-scaled, as in transformers). `mask`: boolean, True = attend; None
    means plain causality. bf16/fp16 decoding steps on the CPU form the scores directly (softmax in fp32): PyTorch's
    CPU flash kernel is several times slower there (see `blip.models.bert._attention`)."""
    causal = mask is None and q.shape[2] > 1
    if q.device.type != "cpu" or q.dtype == torch.float32 or q.shape[2] > 16 or causal:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0)
    scores = torch.matmul(q, k.transpose(-1, -2)).float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(q.dtype), v)


def _attention_mask(attention_mask: torch.Tensor, past: int, length: int) -> torch.Tensor | None:
    """Boolean `[B, 1, T, P+T]` mask (True = attend) for `T` new positions after `P` cached ones, or None when plain
    causality is all there is (no padding, and either nothing cached or a single new position).

    A padding query may see itself, so its row is never empty: its output is unused, but an all-masked row would
    turn into NaNs that reach the real positions through the zero-weighted values."""
    if (past == 0 or length == 1) and bool(attention_mask.all()):
        return None
    device = attention_mask.device
    queries = torch.arange(past, past + length, device=device)[:, None]  # (T, 1)
    keys = torch.arange(past + length, device=device)[None, :]  # (1, P+T)
    real = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, P+T)
    return (keys <= queries) & (real | (keys == queries))


class OptAttention(nn.Module):
    def __init__(self, cfg: OptConfig):
        super().__init__()
        width, bias = cfg.hidden_size, cfg.enable_bias
        self.num_heads = cfg.num_attention_heads
        self.scaling = (width // self.num_heads) ** -0.5
        self.k_proj = Linear(width, width, bias=bias)
        self.v_proj = Linear(width, width, bias=bias)
        self.q_proj = Linear(width, width, bias=bias)
        self.out_proj = Linear(width, width, bias=bias)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int, last_only: bool
    ) -> torch.Tensor:
        """`x [B, T, D]` -> `[B, T, D]`, or `[B, 1, D]` for the last position alone (keys and values: all T)."""
        k = _split_heads(self.k_proj(x), self.num_heads)  # (B, H, T, d)
        v = _split_heads(self.v_proj(x), self.num_heads)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H, P+T, d)
        if last_only:
            x = x[:, -1:]
            mask = None if mask is None else mask[:, :, -1:]
        q = _split_heads(self.q_proj(x) * self.scaling, self.num_heads)  # scaled before the product, as transformers
        y = _attention(q, k, v, mask)  # (B, H, T, d)
        batch, _, length, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(batch, length, -1))


class OptDecoderLayer(nn.Module):
    """Pre-LN block (post-LN when `do_layer_norm_before` is False, as opt-350m)."""

    def __init__(self, cfg: OptConfig):
        super().__init__()
        self.pre_ln = cfg.do_layer_norm_before
        self.self_attn = OptAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine)
        self.fc1 = Linear(cfg.hidden_size, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = Linear(cfg.ffn_dim, cfg.hidden_size, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine)
        self.gelu = cfg.activation_function in ("gelu", "gelu_python")  # fused into fc1
        self.act = ACTIVATIONS[cfg.activation_function]

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x, gelu=True) if self.gelu else self.act(self.fc1(x))
        return self.fc2(h)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        last_only: bool = False,
    ) -> torch.Tensor:
        h = self.self_attn(self.self_attn_layer_norm(x) if self.pre_ln else x, mask, cache, layer, last_only)
        x = (x[:, -1:] if last_only else x) + h
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        x = x + self.mlp(self.final_layer_norm(x) if self.pre_ln else x)
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x


class OptDecoder(nn.Module):
    """Input embeddings `[B, T, E]` -> final hidden states `[B, T, E]` (E = word_embed_proj_dim)."""

    def __init__(self, cfg: OptConfig):
        super().__init__()
        width, embed_dim = cfg.hidden_size, cfg.word_embed_dim
        self.max_positions = cfg.max_position_embeddings
        self.embed_tokens = nn.Embedding(cfg.vocab_size, embed_dim, padding_idx=cfg.pad_token_id)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, width)
        self.project_out = Linear(width, embed_dim, bias=False) if embed_dim != width else None
        self.project_in = Linear(embed_dim, width, bias=False) if embed_dim != width else None
        affine = cfg.layer_norm_elementwise_affine
        self.final_layer_norm = nn.LayerNorm(width, elementwise_affine=affine) if cfg.has_final_layer_norm else None
        self.layers = nn.ModuleList(OptDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def positions(self, attention_mask: torch.Tensor, past: int) -> torch.Tensor:
        """Position ids `[B, T]` of the new positions: the count of real tokens up to each, minus one (padding: -1)."""
        if attention_mask.shape[1] > self.max_positions:
            longest = int(attention_mask.sum(1).max())  # a device sync, only for masks longer than the table
            if longest > self.max_positions:
                raise ValueError(
                    f"{longest} tokens exceed the {self.max_positions} positions of the model "
                    "(text_config.max_position_embeddings)"
                )
        counts = attention_mask.cumsum(1)
        return (counts * attention_mask - 1)[:, past:]

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        batch, length, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if attention_mask.shape != (batch, past + length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({batch}, {past + length}): "
                f"{past} cached + {length} new positions"
            )
        attention_mask = attention_mask.long()
        positions = self.positions(attention_mask, past)  # (B, T)
        mask = _attention_mask(attention_mask, past, length)
        return self.run(inputs_embeds, positions, mask, cache, last_only)

    def run(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """The layers over `inputs_embeds [B, T, E]` at position ids `positions [B, T]` under the boolean attention
        mask `[B, 1, T, P+T]` (None: plain causality) — what `forward` derives from a padding mask; given directly,
        several sequences can share one row (`OptForCausalLM.packed_prefill`)."""
        length = inputs_embeds.shape[1]
        x = inputs_embeds.to(self.embed_positions.weight.dtype)
        if self.project_in is not None:
            x = self.project_in(x)  # (B, T, D)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, cache, i, last_only and i == last)
        if cache is not None:
            cache.advance(length)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OptModel(nn.Module):
    def __init__(self, cfg: OptConfig):
        super().__init__()
        self.decoder = OptDecoder(cfg)


class OptForCausalLM(nn.Module):
    """OPT with its LM head (tied to the token embeddings unless `tie_word_embeddings` is False)."""

    def __init__(self, cfg: OptConfig):
        super().__init__()
        self.config = cfg.validate()
        self.model = OptModel(cfg)
        self.lm_head = Linear(cfg.word_embed_dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids `[B, T]` -> embeddings `[B, T, E]` (E = word_embed_proj_dim), the `inputs_embeds` of forward."""
        return self.model.decoder.embed_tokens(input_ids)

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache for `capacity` positions (cached + new, padding included)."""
        return KVCache(self.config.num_hidden_layers, capacity)

    def packed_prefill(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, *, cache: KVCache
    ) -> torch.Tensor:
        """Final hidden states `[B, T, E]` of rows that each pack several sequences (e.g. a shared prefix followed by
        every question's own tokens): explicit position ids `[B, T]` and boolean mask `[B, 1, T, T]` (True = attend);
        `cache` (empty) takes every position's keys/values. `logits_of` turns chosen hidden states into logits."""
        return self.model.decoder.run(inputs_embeds, positions, mask, cache)

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits `[B, T, V]` (`[B, 1, V]`, the last position's, with `last_only`) in the parameters' dtype.

        `inputs_embeds [B, T, E]`: the new positions; `attention_mask [B, P+T]`: 1 = real, 0 = (left) padding, over
        the `P` positions already in `cache` and the `T` new ones. The cache, when given, takes the new keys/values.
        """
        x = self.model.decoder(inputs_embeds, attention_mask, cache, last_only)
        return self.lm_head(x)
