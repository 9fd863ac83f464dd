"""NLVR2 (visual reasoning over an image pair): the image-grounded text encoder with twin cross-attention.

Each text layer cross-attends to the two images separately: `self0` (image a) and `self1` (image b) are two sets of
query/key/value projections, `dense0`/`dense1` their output projections, and one LayerNorm is shared. The two
results are combined by depth: the first half of the layers average them, `(h0 + h1) / 2`; the second half
concatenate and project, `merge_layer(cat(h0, h1))` (Linear 2H -> H, no activation). The original (12 layers)
averages in layers 0-5 and merges in 6-11; "first half" generalises that to any depth: layer i merges when
`i >= num_layers // 2` (2 layers: layer 0 averages, layer 1 merges). Then dropout, residual, the shared LayerNorm
and the feed-forward block, as in every BERT layer. A `cls_head` MLP (Linear H->H, ReLU, Linear H->2) reads the
`[ENC]` position; class 1 = the statement is true.

Parameter names follow the original `model_base_nlvr.pth` (`crossattention.self0.query`,
`crossattention.output.dense0`, `crossattention.output.merge_layer`, `cls_head.0`): its text side needs no
renaming. Tensors in, tensors out.
"""

from __future__ import annotations

import torch
from torch import nn

from blip.config import TextConfig
from blip.models.bert import (
    AttentionOutput,
    AttentionProjections,
    Intermediate,
    TextAttention,
    TextEmbeddings,
    _attention,
    _self_attention_mask,
    _split_heads,
)
from blip.models.kernels import Linear


def merges(layer: int, num_layers: int) -> bool:
    """Whether text layer `layer` of `num_layers` merges the two images' results (else it averages them)."""
    return layer >= num_layers // 2


class TwinCrossOutput(nn.Module):
    """dense0(h0), dense1(h1) -> average or merge_layer -> dropout -> residual -> the shared LayerNorm."""

    def __init__(self, cfg: TextConfig, merge: bool):
        super().__init__()
        width = cfg.hidden_size
        self.dense0 = Linear(width, width)
        self.dense1 = Linear(width, width)
        self.merge_layer = Linear(2 * width, width) if merge else None
        self.LayerNorm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, y0: torch.Tensor, y1: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h0, h1 = self.dense0(y0), self.dense1(y1)  # (B, T, H) each
        h = self.merge_layer(torch.cat([h0, h1], dim=-1)) if self.merge_layer is not None else (h0 + h1) / 2
        return self.LayerNorm(residual + self.dropout(h))


class TwinCrossAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int, merge: bool):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.dropout = cfg.attention_probs_dropout_prob
        self.self0 = AttentionProjections(cfg.hidden_size, kv_width)  # image a
        self.self1 = AttentionProjections(cfg.hidden_size, kv_width)  # image b
        self.output = TwinCrossOutput(cfg, merge)

    def _attend(self, proj: AttentionProjections, x: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None):
        q = _split_heads(proj.query(x), self.num_heads)  # (B, H, T, d)
        k = _split_heads(proj.key(image), self.num_heads)  # (B, H, N, d)
        v = _split_heads(proj.value(image), self.num_heads)
        y = _attention(q, k, v, mask, self.dropout if self.training else 0.0)
        batch, _, length, _ = y.shape
        return y.transpose(1, 2).reshape(batch, length, -1)  # (B, T, H)

    def forward(
        self,
        x: torch.Tensor,
        image_a: torch.Tensor,
        image_b: torch.Tensor,
        mask_a: torch.Tensor | None = None,
        mask_b: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y0 = self._attend(self.self0, x, image_a, mask_a)
        y1 = self._attend(self.self1, x, image_b, mask_b)
        return self.output(y0, y1, x)


class NlvrTextLayer(nn.Module):
    def __init__(self, cfg: TextConfig, cross_width: int, merge: bool):
        super().__init__()
        self.attention = TextAttention(cfg, cfg.hidden_size)
        self.crossattention = TwinCrossAttention(cfg, cross_width, merge)
        self.intermediate = Intermediate(cfg)
        self.output = AttentionOutput(cfg, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        image_a: torch.Tensor,
        image_b: torch.Tensor,
        layer: int,
        queries: int | None = None,
    ) -> torch.Tensor:
        x = self.attention.forward_self(x, mask, False, None, layer, queries)
        x = self.crossattention(x, image_a, image_b)
        return self.output(self.intermediate(x), x)


class NlvrTextLayers(nn.Module):
    def __init__(self, cfg: TextConfig, cross_width: int):
        super().__init__()
        n = cfg.num_hidden_layers
        self.layer = nn.ModuleList(NlvrTextLayer(cfg, cross_width, merges(i, n)) for i in range(n))


class NlvrTextTransformer(nn.Module):
    """token ids `[B, T]` + both images' tokens `[B, N, Dv]` -> hidden states `[B, T, D]` (bidirectional)."""

    def __init__(self, cfg: TextConfig, cross_width: int):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = NlvrTextLayers(cfg, cross_width)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_a: torch.Tensor,
        image_b: torch.Tensor,
        *,
        first_only: bool = False,
    ) -> torch.Tensor:
        """Hidden states `[B, T, D]`; with `first_only` the last layer computes position 0 alone (`[B, 1, D]`)."""
        x = self.embeddings(input_ids)
        mask = _self_attention_mask(attention_mask, False, x.shape[1])
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, image_a, image_b, i, 1 if first_only and i == last else None)
        return x


class ClsHead(nn.Sequential):
    """Linear(H, H) -> ReLU -> Linear(H, 2): `cls_head.0` / `cls_head.2` in the checkpoint; class 1 = true."""

    def __init__(self, width: int):
        super().__init__(Linear(width, width), nn.ReLU(), Linear(width, 2))
