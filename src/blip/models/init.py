"""Weight initialisation for models trained from scratch (BERT/ViT conventions: truncated normal, std 0.02).

The ViT's position table can instead start as 2-D sine-cosine values (as MAE's fixed table; here only the start,
it still learns): a normal table of std 0.02-0.1 sits far below the patch embeddings' scale, and a short run from
scratch barely moves it (the demo's 1000 steps left its std at 0.0999 of 0.1), so its image tokens hardly know
where they are.
"""

from __future__ import annotations

import torch
from torch import nn

from blip.models.blip import BlipModel

POSITION_INITS = ("normal", "sincos")


def sincos_position_table(grid_size: int, dim: int) -> torch.Tensor:
    """`[1, 1 + grid_size**2, dim]`: zeros for the CLS token, then per patch (row-major) sin/cos of its row in the
    first half of the channels and of its column in the second, at `dim // 4` frequencies 1 / 10000**(i / (dim/4))."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")

    def encode(coordinate: torch.Tensor) -> torch.Tensor:  # (g*g,) -> (g*g, dim / 2)
        angles = coordinate.reshape(-1, 1).double() * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(rows), encode(cols)], dim=1).float()
    return torch.cat([torch.zeros(1, dim), table])[None]


def init_weights(model: BlipModel, std: float = 0.02, positions: str = "normal") -> None:
    """Truncated-normal weights (`std`), unit LayerNorms, zero biases; the ViT position table `positions`:
    "normal" (like every other weight) or "sincos" (`sincos_position_table`)."""
    if positions not in POSITION_INITS:
        raise ValueError(f"unknown position init {positions!r}; expected one of {', '.join(POSITION_INITS)}")
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    embeddings = model.vision_model.embeddings
    if positions == "sincos":
        num_positions, dim = embeddings.position_embedding.shape[1:]
        grid = int(round((num_positions - 1) ** 0.5))
        with torch.no_grad():
            embeddings.position_embedding.copy_(sincos_position_table(grid, dim))
    else:
        nn.init.trunc_normal_(embeddings.position_embedding, std=std)
    nn.init.trunc_normal_(embeddings.class_embedding, std=std)
    if model.text_decoder is not None:
        nn.init.zeros_(model.text_decoder.cls.predictions.bias)
        model.text_decoder.tie_weights()
