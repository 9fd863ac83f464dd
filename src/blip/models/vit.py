"""Pre-LayerNorm ViT image encoder (ViT-B/16, ViT-L/16) as BLIP uses it.

Parameter names follow the Hugging Face BLIP layout (`embeddings.class_embedding`, `encoder.layers.{i}.self_attn.qkv`,
...) so those checkpoints load without renaming; `blip.weights.convert` maps the original Salesforce names here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip.config import VisionConfig
from blip.models.kernels import Linear


def resize_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Bicubically resize a `[1, 1 + g*g, D]` position table to `[1, 1 + grid_size**2, D]` (the CLS row is kept)."""
    old_grid = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if old_grid == grid_size:
        return pos_embed
    if old_grid * old_grid != pos_embed.shape[1] - 1:
        raise ValueError(f"position embedding of {pos_embed.shape[1] - 1} patches is not a square grid")
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patch_pos = patch_pos.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim)
    return torch.cat([cls_pos, patch_pos], dim=1)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_positions, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        if height != width:
            raise ValueError(f"expected square images, got {height}x{width}")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, D)
        cls = self.class_embedding.expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, N, D)
        pos = self.position_embedding
        if pos.shape[1] != x.shape[1]:
            pos = resize_pos_embed(pos, height // self.patch_size)
        return x + pos


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.dropout = cfg.attention_dropout
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.projection = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, length, dim)
        return self.projection(y)


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x, gelu=True))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, drop_path: float = 0.0):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMlp(cfg)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.self_attn(self.layer_norm1(x)))
        x = x + self.drop_path(self.mlp(self.layer_norm2(x)))
        return x


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        n = cfg.num_hidden_layers
        rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear stochastic-depth ramp
        self.layers = nn.ModuleList(VisionBlock(cfg, rate) for rate in rates)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class VisionTransformer(nn.Module):
    """pixels `[B, 3, S, S]` -> image tokens `[B, 1 + (S/p)^2, D]`; token 0 is the image CLS used by ITC."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        x = self.encoder(x)
        return self.post_layernorm(x)
