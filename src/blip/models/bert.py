"""The MED text side: a post-LayerNorm BERT whose layers optionally cross-attend to another sequence.

One `TextTransformer` class serves all three BLIP roles, chosen by the caller, not by a mode string:
- unimodal encoder (ITC): bidirectional, no cross-attention;
- image-grounded encoder (ITM, VQA question): bidirectional + cross-attention (pass `cross`);
- image-grounded decoder (captions, answers): causal + cross-attention, usually with a `KVCache`.

Cross-attention keys/values are projected once per encoder sequence (`cross_kv`) and shared by every row that
reads it: rows are grouped per encoder sequence, so beams and sampled captions of one image attend to a single copy.
Parameter names follow the Hugging Face BLIP layout (`encoder.layer.{i}.attention.self.query`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip.config import TextConfig
from blip.models.kernels import Linear, linear


@dataclass
class AttentionProbe:
    """Asks one cross-attention layer to form its probabilities explicitly (not fused) and keep them, `[B, H, T, N]`,
    in `probs`: a tensor that requires grad, so the gradient of a score with respect to it can be taken (Grad-CAM)."""

    layer: int
    probs: torch.Tensor | None = None


@dataclass
class CrossKV:
    """Per-layer cross-attention keys/values of `E` encoder sequences, each `[E, H, N, d]`.

    Rows of the text batch map onto them either by grouping (row r reads sequence r // (B / E)) or, when `index`
    is set, by an explicit row -> sequence index. `mask` is a boolean `[E, 1, 1, N]` (True = attend) or None.
    `probe`: the one layer whose attention probabilities are kept (see `AttentionProbe`); None on every normal path.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor | None = None
    index: torch.Tensor | None = None
    probe: AttentionProbe | None = None

    def select(self, index: torch.Tensor) -> CrossKV:
        """Keep encoder sequences `index` (used when finished images leave the batch)."""
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return CrossKV(
            [k.index_select(0, index) for k in self.keys], [v.index_select(0, index) for v in self.values], mask
        )


class KVCache:
    """Self-attention keys/values, preallocated to `capacity` positions so decoding steps never reallocate."""

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # positions filled (same for every row: decoding batches carry no padding)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], max(self.capacity, end), k.shape[3])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        buf_k, buf_v = self.keys[layer], self.values[layer]
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def select(self, index: torch.Tensor) -> None:
        """Reorder/subset rows (beam reordering, finished rows leaving); only the filled prefix is moved."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is None:
                continue
            if index.numel() == k.shape[0]:
                k[:, :, : self.length] = k[index, :, : self.length]
                v[:, :, : self.length] = v[index, :, : self.length]
            else:
                self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, dim = x.shape
    return x.view(batch, length, num_heads, dim // num_heads).transpose(1, 2)  # (B, H, T, d)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """SDPA, except for bf16/fp16 on CPU with few queries per row (decoding): there PyTorch's CPU flash kernel is
    2.5-4x slower than two matmuls (measured, torch 2.13), so the scores are formed directly, softmax in fp32.
    float32 always takes SDPA, so fp32 results stay exactly what they were."""
    if q.device.type != "cpu" or q.dtype == torch.float32 or dropout or q.shape[-2] > 16:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(q.dtype), v)


def _attend_grouped(q: torch.Tensor, cross: CrossKV, layer: int, dropout: float) -> torch.Tensor:
    """Cross-attention of `[B, H, T, d]` queries against `E` shared encoder sequences without copying them per row."""
    k, v, mask = cross.keys[layer], cross.values[layer], cross.mask
    if cross.index is not None:
        k, v = k.index_select(0, cross.index), v.index_select(0, cross.index)
        mask = None if mask is None else mask.index_select(0, cross.index)
        return _attention(q, k, v, mask, dropout)
    batch, heads, length, dim = q.shape
    groups = batch // k.shape[0]
    if groups == 1:
        return _attention(q, k, v, mask, dropout)
    # (E*G, H, T, d) -> (E, H, G*T, d): the G rows of one encoder sequence become one longer query block.
    q = q.view(-1, groups, heads, length, dim).transpose(1, 2).reshape(-1, heads, groups * length, dim)
    y = _attention(q, k, v, mask, dropout)
    return y.view(-1, heads, groups, length, dim).transpose(1, 2).reshape(batch, heads, length, dim)


def _attend_probed(q: torch.Tensor, cross: CrossKV, layer: int, dropout: float) -> torch.Tensor:
    """Cross-attention with the probabilities formed explicitly and kept in `cross.probe.probs` `[B, H, T, N]`.

    When nothing upstream requires grad (inference), the probabilities become a leaf that does: the gradient of a
    later score with respect to them is all Grad-CAM needs, and no parameter gradient is formed."""
    k, v, mask = cross.keys[layer], cross.values[layer], cross.mask
    rows = cross.index
    if rows is None:
        rows = torch.arange(q.shape[0], device=q.device) // (q.shape[0] // k.shape[0])
    k, v = k.index_select(0, rows), v.index_select(0, rows)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (B, H, T, N)
    if mask is not None:
        scores = scores.masked_fill(~mask.index_select(0, rows), float("-inf"))
    probs = scores.softmax(-1)
    if not probs.requires_grad:
        probs.requires_grad_()
    cross.probe.probs = probs
    return torch.matmul(F.dropout(probs, dropout, training=dropout > 0).to(v.dtype), v)


class AttentionProjections(nn.Module):
    def __init__(self, hidden: int, kv_width: int):
        super().__init__()
        self.query = Linear(hidden, hidden)
        self.key = Linear(kv_width, hidden)
        self.value = Linear(kv_width, hidden)


class AttentionOutput(nn.Module):
    """dense -> dropout -> residual -> LayerNorm (post-LN); also the FFN's second half with `in_width`."""

    def __init__(self, cfg: TextConfig, in_width: int | None = None):
        super().__init__()
        self.dense = Linear(in_width or cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(y)))


class TextAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.dropout = cfg.attention_probs_dropout_prob
        self.self = AttentionProjections(cfg.hidden_size, kv_width)  # named `self` by the checkpoint layout
        self.output = AttentionOutput(cfg)

    def project_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split_heads(self.self.key(states), self.num_heads), _split_heads(
            self.self.value(states), self.num_heads
        )

    def forward_self(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
        cache: KVCache | None,
        layer: int,
        queries: int | None = None,
    ) -> torch.Tensor:
        """Self-attention; with `queries`, only the first `queries` positions are computed (keys see all)."""
        k, v = self.project_kv(x)
        if queries is not None:
            x = x[:, :queries]
            mask = mask[:, :, :queries] if mask is not None and mask.shape[2] > 1 else mask
        q = _split_heads(self.self.query(x), self.num_heads)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if causal and mask is None:
            # Queries are the last T of the S keys; with T == 1 there is nothing to mask.
            is_causal = q.shape[2] > 1
            if is_causal and q.shape[2] != k.shape[2]:
                raise ValueError("a multi-token step over a non-empty cache needs an explicit mask")
            y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        batch, _, length, _ = y.shape
        return self.output(y.transpose(1, 2).reshape(batch, length, -1), x)

    def forward_cross(self, x: torch.Tensor, cross: CrossKV, layer: int) -> torch.Tensor:
        q = _split_heads(self.self.query(x), self.num_heads)
        dropout = self.dropout if self.training else 0.0
        if cross.probe is not None and cross.probe.layer == layer:
            y = _attend_probed(q, cross, layer, dropout)
        else:
            y = _attend_grouped(q, cross, layer, dropout)
        batch, _, length, _ = y.shape
        return self.output(y.transpose(1, 2).reshape(batch, length, -1), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x, gelu=True)


class TextLayer(nn.Module):
    def __init__(self, cfg: TextConfig, cross_width: int | None):
        super().__init__()
        self.attention = TextAttention(cfg, cfg.hidden_size)
        self.crossattention = TextAttention(cfg, cross_width) if cross_width else None
        self.intermediate = Intermediate(cfg)
        self.output = AttentionOutput(cfg, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
        cross: CrossKV | None,
        cache: KVCache | None,
        layer: int,
        queries: int | None = None,
    ) -> torch.Tensor:
        x = self.attention.forward_self(x, mask, causal, cache, layer, queries)
        if cross is not None:
            x = self.crossattention.forward_cross(x, cross, layer)
        return self.output(self.intermediate(x), x)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class TextEncoderLayers(nn.Module):
    def __init__(self, cfg: TextConfig, cross_width: int | None):
        super().__init__()
        self.layer = nn.ModuleList(TextLayer(cfg, cross_width) for _ in range(cfg.num_hidden_layers))


class TextTransformer(nn.Module):
    """token ids `[B, T]` -> hidden states `[B, T, D]` (BERT, post-LN), optionally cross-attending."""

    def __init__(self, cfg: TextConfig, cross_width: int | None):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = TextEncoderLayers(cfg, cross_width)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    def cross_kv(
        self, states: torch.Tensor, mask: torch.Tensor | None = None, index: torch.Tensor | None = None
    ) -> CrossKV:
        """Project `states [E, N, W]` to every layer's cross-attention K/V once. `mask`: `[E, N]`, 1 = attend."""
        keys, values = [], []
        for layer in self.layers:
            k, v = layer.crossattention.project_kv(states)
            # Contiguous once here, so no decoding step has to copy them (a strided [E, H, N, d] cannot be viewed
            # as the [E*H, N, d] batch a matmul needs: 12% of a bf16 caption went to those copies).
            keys.append(k.contiguous())
            values.append(v.contiguous())
        bool_mask = None if mask is None or bool(mask.all()) else mask[:, None, None, :].bool()
        return CrossKV(keys, values, bool_mask, index)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cross: CrossKV | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        first_only: bool = False,
    ) -> torch.Tensor:
        """Hidden states `[B, T, D]`; with `first_only` (bidirectional use, e.g. ITC/ITM heads that read position
        0 only) the last layer computes position 0 alone and `[B, 1, D]` is returned."""
        start = cache.length if cache is not None else 0
        x = self.embeddings(input_ids, start)
        mask = _self_attention_mask(attention_mask, causal, x.shape[1])
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, causal, cross, cache, i, 1 if first_only and i == last else None)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return x


def _self_attention_mask(attention_mask: torch.Tensor | None, causal: bool, length: int) -> torch.Tensor | None:
    """Boolean `[B, 1, T, T]` mask (True = attend), or None when nothing is masked beyond plain causality."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    keys = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
    if not causal:
        return keys
    tri = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return keys & tri


class PredictionTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x, gelu=True))


class LMPredictions(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.decoder = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # weight tied to word embeddings
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.transform(x), self.decoder.weight, self.bias)


class LMHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.predictions = LMPredictions(cfg)


class TextDecoder(nn.Module):
    """Causal image-grounded decoder with its LM head (`bert` + `cls` in the checkpoint layout)."""

    def __init__(self, cfg: TextConfig, cross_width: int):
        super().__init__()
        self.bert = TextTransformer(cfg, cross_width)
        self.cls = LMHead(cfg)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cross: CrossKV | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits `[B, T, V]` (or `[B, V]` for the last position with `last_only`)."""
        h = self.bert(input_ids, attention_mask, cross=cross, causal=True, cache=cache)
        if last_only:
            h = h[:, -1]
        return self.cls.predictions(h)
