"""The reduced-precision CPU attention path (few queries: decoding) equals SDPA up to bf16 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blip.models.bert import _attention


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("queries", [1, 3, 16])
def test_matches_sdpa_with_and_without_a_mask(dtype, queries):
    gen = torch.Generator().manual_seed(queries)
    q, k, v = (torch.randn(4, 3, n, 8, generator=gen).to(dtype) for n in (queries, 50, 50))
    mask = torch.ones(4, 1, 1, 50, dtype=torch.bool)
    mask[1, ..., 30:] = False  # a padded encoder sequence
    for m in (None, mask):
        ours = _attention(q, k, v, m, 0.0).float()
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m)
        assert (ours - reference).abs().max() < 2e-2


def test_float32_and_long_queries_take_sdpa_exactly():
    q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    assert torch.equal(_attention(q, k, v, None, 0.0), F.scaled_dot_product_attention(q, k, v))
    q = torch.randn(2, 2, 40, 8, dtype=torch.bfloat16)
    k, v = k.bfloat16(), v.bfloat16()
    assert torch.equal(_attention(q, k, v, None, 0.0), F.scaled_dot_product_attention(q, k, v))


def test_cross_kv_is_stored_contiguous():
    """Decoding steps batch the cross-attention K/V as [E*H, N, d] matmul operands: a strided layout would be copied
    at every step and layer."""
    from blip.config import TextConfig
    from blip.models.bert import TextTransformer

    cfg = TextConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32)
    with torch.inference_mode():
        cross = TextTransformer(cfg, cross_width=12).eval().cross_kv(torch.randn(3, 7, 12))
    assert all(t.is_contiguous() and t.shape == (3, 4, 7, 4) for t in cross.keys + cross.values)
