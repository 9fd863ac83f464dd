"""Weight initialisation for models trained from scratch (BERT/ViT conventions: truncated normal, std 0.02)."""

from __future__ import annotations

from torch import nn

from blip.models.blip import BlipModel


def init_weights(model: BlipModel, std: float = 0.02) -> None:
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
    nn.init.trunc_normal_(embeddings.position_embedding, std=std)
    nn.init.trunc_normal_(embeddings.class_embedding, std=std)
    if model.text_decoder is not None:
        nn.init.zeros_(model.text_decoder.cls.predictions.bias)
        model.text_decoder.tie_weights()
