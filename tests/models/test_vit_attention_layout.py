"""The vision encoders hand SDPA what its flash kernel takes on a GPU: `[B, H, N, d]` views whose last dimension is
contiguous (the fused qkv product's own memory: no copy), no mask, the model's dtype (fp16/bf16 in, fp16/bf16 out),
and head sizes flash supports (a multiple of 8, at most 256) for BLIP's ViT-B/L and BLIP-2's EVA ViT-g. The outputs
are plain softmax attention (checked against it on the CPU). The GPU benchmark (benchmarks/gpu.py) runs the encoder
with SDPA restricted to the flash kernel, so a layout flash cannot take fails there instead of silently running
another kernel."""

from __future__ import annotations

import pytest
import torch

from blip.blip2_config import Blip2VisionConfig
from blip.config import PRESETS, VisionConfig
from blip.models import vit
from blip.models.blip2.eva_vit import EvaVisionTransformer
from blip.models.vit import VisionTransformer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eva", [False, True])
def test_sdpa_gets_a_flash_layout_and_plain_attention_results(monkeypatch, dtype, eva):
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32)
    cfg = (Blip2VisionConfig if eva else VisionConfig)(patch_size=8, **sizes)
    torch.manual_seed(0)
    model = (EvaVisionTransformer(cfg) if eva else VisionTransformer(cfg)).to(dtype).eval()
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, **kwargs):
        calls.append((q, k, v, attn_mask, dropout_p, kwargs))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(vit.F, "scaled_dot_product_attention", spy)
    with torch.inference_mode():
        model(torch.randn(2, 3, 32, 32).to(dtype))
    assert len(calls) == cfg.num_hidden_layers
    for q, k, v, mask, dropout, kwargs in calls:
        assert mask is None and dropout == 0.0 and not kwargs.get("is_causal", False)
        for t in (q, k, v):
            assert t.shape == (2, 4, 1 + 16, 16) and t.dtype == dtype and t.stride(-1) == 1
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        expected = scores.softmax(-1) @ v.float()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(real(q, k, v).float(), expected, atol=tol, rtol=tol)


def test_real_head_sizes_suit_flash():
    for cfg in (PRESETS["blip_base_caption"].vision, PRESETS["blip_large_caption"].vision, Blip2VisionConfig()):
        head = cfg.hidden_size // cfg.num_attention_heads
        assert head % 8 == 0 and head <= 256, cfg
