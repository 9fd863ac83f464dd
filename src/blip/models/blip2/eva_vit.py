"""BLIP-2's image encoder: EVA ViT-g/14 (width 1408, 39 layers, 16 heads, 224 px). Tensors in, tensors out.

It is BLIP's pre-LN ViT (`blip.models.vit`) with LayerNorm eps 1e-6 and an attention bias that is zero on the keys:
transformers 5 stores it as one `qkv.bias` vector `[q_bias | 0 | v_bias]` (a checkpoint with separate `q_bias` /
`v_bias` entries is fused by `blip.weights.convert`), so the fused `qkv` Linear of `vit.py` holds it unchanged.
With `qkv_bias` false there is no bias at all. Keys: `vision_model.embeddings.*`, `encoder.layers.{i}.self_attn.
{qkv,projection}`, `layer_norm1/2`, `mlp.fc1/fc2`, `post_layernorm`, as in transformers' `Blip2VisionModel`.
"""

from __future__ import annotations

from blip.blip2_config import Blip2VisionConfig
from blip.models.kernels import Linear
from blip.models.vit import VisionTransformer


class EvaVisionTransformer(VisionTransformer):
    """pixels `[B, 3, S, S]` -> image tokens `[B, 1 + (S/p)^2, D]` (post-LayerNorm applied to every token)."""

    def __init__(self, cfg: Blip2VisionConfig):
        super().__init__(cfg)
        if not cfg.qkv_bias:
            for layer in self.encoder.layers:
                layer.self_attn.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
