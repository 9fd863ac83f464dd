"""The Q-Former: a post-LN BERT over learned query tokens that cross-attends to image tokens. Tensors in and out.

Query tokens `[B, Q, D]` (and, for the retrieval model, text embeddings after them) pass through `layernorm` and
dropout, then each layer: self-attention over the whole sequence (queries and text see each other), cross-attention
from the queries only to the image tokens on layers `i % cross_attention_frequency == 0`, and a feed-forward block
that is separate for query positions (`intermediate_query` / `output_query`) and text positions (`intermediate` /
`output`, present only with `use_qformer_text_input`). Text alone (`queries=0`, the ITC text side) skips the
cross-attention. In a float16 model transformers keeps this module, and the query tokens, in float32; so does our
loader, and `forward` casts its inputs (query/text embeddings, image tokens) to the module's dtype.

Parameter names follow transformers' `Blip2QFormerModel` (`layernorm`, `encoder.layer.{i}.attention.attention.query`,
`attention.output.{dense,LayerNorm}`, `crossattention.*`, `intermediate_query.dense`, `output_query.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip.blip2_config import QFormerConfig
from blip.models.bert import AttentionOutput, AttentionProjections, Intermediate, _split_heads


class QFormerAttention(nn.Module):
    """Multi-head attention (`attention.{query,key,value}`) + dense/residual/LayerNorm (`output`)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.dropout = cfg.attention_probs_dropout_prob
        self.attention = AttentionProjections(cfg.hidden_size, kv_width)
        self.output = AttentionOutput(cfg)  # duck-typed: hidden_size, layer_norm_eps, hidden_dropout_prob

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`x [B, T, D]` attends to `source [B, N, W]` (itself when None); `mask` boolean `[B, 1, 1, N]`."""
        source = x if source is None else source
        q = _split_heads(self.attention.query(x), self.num_heads)  # (B, H, T, d)
        k = _split_heads(self.attention.key(source), self.num_heads)  # (B, H, N, d)
        v = _split_heads(self.attention.value(source), self.num_heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        batch, _, length, _ = y.shape
        return self.output(y.transpose(1, 2).reshape(batch, length, -1), x)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = QFormerAttention(cfg, cfg.hidden_size)
        cross = index % cfg.cross_attention_frequency == 0
        self.crossattention = QFormerAttention(cfg, cfg.encoder_hidden_size) if cross else None
        if cfg.use_qformer_text_input:
            self.intermediate = Intermediate(cfg)
            self.output = AttentionOutput(cfg, cfg.intermediate_size)
        else:
            self.intermediate = self.output = None
        self.intermediate_query = Intermediate(cfg)
        self.output_query = AttentionOutput(cfg, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, queries: int, image: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.attention(x, mask)  # (B, Q + T, D)
        query, text = x[:, :queries], x[:, queries:]
        parts = []
        if queries:
            if self.crossattention is not None:
                if image is None:
                    raise ValueError("the Q-Former's query tokens need image tokens to cross-attend to")
                query = self.crossattention(query, None, image)
            parts.append(self.output_query(self.intermediate_query(query), query))
        if text.shape[1]:
            if self.intermediate is None:
                raise ValueError("this Q-Former has no text feed-forward (qformer_config.use_qformer_text_input)")
            parts.append(self.output(self.intermediate(text), text))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class QFormer(nn.Module):
    """embeddings `[B, Q + T, D]` (queries first) -> hidden states `[B, Q + T, D]`, in the module's dtype."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = QFormerEncoder(cfg)

    def forward(
        self,
        embeds: torch.Tensor,
        queries: int,
        attention_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`queries`: how many leading positions are query tokens (0: text only); `attention_mask [B, Q + T]`
        (1 = attend) masks keys of the self-attention; `image [B, N, W]`: the image tokens (every one attended)."""
        dtype = self.layernorm.weight.dtype
        x = self.dropout(self.layernorm(embeds.to(dtype)))
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, L)
        image = None if image is None else image.to(dtype)
        for layer in self.encoder.layer:
            x = layer(x, mask, queries, image)
        return x


class QFormerTextEmbeddings(nn.Module):
    """The retrieval model's text embeddings: word + absolute position (no LayerNorm: the Q-Former's `layernorm`
    normalises queries and text together). Keys `embeddings.{word,position}_embeddings`."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, D)
