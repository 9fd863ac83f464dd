"""The original BLIP `.pth` key layout, written out here from the original code's module names (`visual_encoder`
is timm's ViT: `blocks.{i}.attn.qkv`, `norm1`, ...), independently of `blip.weights.convert`.

Tests build original-layout files with these names, so a wrong name in the conversion table fails them: building
the input with `convert.to_salesforce` (the table's own inverse) could not.
"""

from __future__ import annotations

import re

import torch

# HF/our name -> original name, for the ViT entries outside the blocks.
VISION_OUTSIDE_BLOCKS = {
    "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
    "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
    "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
    "vision_model.post_layernorm.weight": "visual_encoder.norm.weight",
    "vision_model.post_layernorm.bias": "visual_encoder.norm.bias",
}
# ... and inside block i (`vision_model.encoder.layers.{i}.X` <-> `visual_encoder.blocks.{i}.Y`).
VISION_BLOCK = {
    "layer_norm1.weight": "norm1.weight",
    "layer_norm1.bias": "norm1.bias",
    "self_attn.qkv.weight": "attn.qkv.weight",
    "self_attn.qkv.bias": "attn.qkv.bias",
    "self_attn.projection.weight": "attn.proj.weight",
    "self_attn.projection.bias": "attn.proj.bias",
    "layer_norm2.weight": "norm2.weight",
    "layer_norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
BLOCK = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)")


def original_name(key: str) -> str:
    """The original file's name for an HF-layout key; the text side and the heads keep their names."""
    if key in VISION_OUTSIDE_BLOCKS:
        return VISION_OUTSIDE_BLOCKS[key]
    if m := BLOCK.fullmatch(key):
        return f"visual_encoder.blocks.{m.group(1)}.{VISION_BLOCK[m.group(2)]}"
    assert not key.startswith("vision_model."), key
    return key


def to_original(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF-layout state dict (as `save_pretrained` writes it) in the original layout: renamed, the LM head's tied
    entries written out (the original saves every name), and each text part's `position_ids` buffer."""
    out = {original_name(k): v for k, v in hf_state.items()}
    if "text_decoder.cls.predictions.bias" in out:
        out["text_decoder.cls.predictions.decoder.weight"] = out["text_decoder.bert.embeddings.word_embeddings.weight"]
        out["text_decoder.cls.predictions.decoder.bias"] = out["text_decoder.cls.predictions.bias"]
    for prefix in ("text_encoder.", "text_decoder.bert."):
        table = out.get(prefix + "embeddings.position_embeddings.weight")
        if table is not None:
            out[prefix + "embeddings.position_ids"] = torch.arange(table.shape[0])[None]
    return out


def original_keys(kind: str, vision_layers: int = 12, text_layers: int = 12) -> list[str]:
    """Every key of an original inference file of `kind` (caption: ViT + decoder; retrieval: ViT + encoder + heads),
    spelled out from the original modules: for the base size, 150 ViT entries, 324 decoder entries, 317 encoder."""
    keys = [
        "visual_encoder.cls_token",
        "visual_encoder.pos_embed",
        "visual_encoder.patch_embed.proj.weight",
        "visual_encoder.patch_embed.proj.bias",
    ]
    for i in range(vision_layers):
        for module in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"visual_encoder.blocks.{i}.{module}.weight", f"visual_encoder.blocks.{i}.{module}.bias"]
    keys += ["visual_encoder.norm.weight", "visual_encoder.norm.bias"]

    def bert(prefix: str) -> list[str]:
        names = [
            f"{prefix}embeddings.position_ids",
            f"{prefix}embeddings.word_embeddings.weight",
            f"{prefix}embeddings.position_embeddings.weight",
            f"{prefix}embeddings.LayerNorm.weight",
            f"{prefix}embeddings.LayerNorm.bias",
        ]
        for i in range(text_layers):
            layer = f"{prefix}encoder.layer.{i}."
            for module in (
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "attention.output.LayerNorm",
                "crossattention.self.query",
                "crossattention.self.key",
                "crossattention.self.value",
                "crossattention.output.dense",
                "crossattention.output.LayerNorm",
                "intermediate.dense",
                "output.dense",
                "output.LayerNorm",
            ):
                names += [f"{layer}{module}.weight", f"{layer}{module}.bias"]
        return names

    if kind in ("caption", "vqa"):
        keys += bert("text_decoder.bert.")
        keys += [
            "text_decoder.cls.predictions.bias",
            "text_decoder.cls.predictions.transform.dense.weight",
            "text_decoder.cls.predictions.transform.dense.bias",
            "text_decoder.cls.predictions.transform.LayerNorm.weight",
            "text_decoder.cls.predictions.transform.LayerNorm.bias",
            "text_decoder.cls.predictions.decoder.weight",
            "text_decoder.cls.predictions.decoder.bias",
        ]
    if kind in ("retrieval", "vqa"):
        keys += bert("text_encoder.")
    if kind == "retrieval":
        keys += [f"{head}.{p}" for head in ("vision_proj", "text_proj", "itm_head") for p in ("weight", "bias")]
    return keys
