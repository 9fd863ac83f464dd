"""THE place where foreign checkpoint keys are mapped onto ours (and back).

Our modules use the Hugging Face BLIP key layout, so an HF state dict needs only its tied/derived entries
normalised; the original Salesforce `.pth` layout differs in the ViT names and carries training-only state
(momentum encoders, feature queues, temperature) that inference models drop. See docs/checkpoints.md.
"""

from __future__ import annotations

import re

import torch

from blip.config import BlipConfig, TextConfig, VisionConfig

# Original (Salesforce) ViT names <-> HF names; "{i}" is a layer number. Whole names end without a dot; the
# others are prefixes followed by "weight"/"bias".
VISION_NAMES: list[tuple[str, str]] = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.blocks.{i}.norm1.", "vision_model.encoder.layers.{i}.layer_norm1."),
    ("visual_encoder.blocks.{i}.norm2.", "vision_model.encoder.layers.{i}.layer_norm2."),
    ("visual_encoder.blocks.{i}.attn.qkv.", "vision_model.encoder.layers.{i}.self_attn.qkv."),
    ("visual_encoder.blocks.{i}.attn.proj.", "vision_model.encoder.layers.{i}.self_attn.projection."),
    ("visual_encoder.blocks.{i}.mlp.", "vision_model.encoder.layers.{i}.mlp."),
    ("visual_encoder.norm.", "vision_model.post_layernorm."),
]


def _swaps(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(regex, replacement) pairs mapping the left names of `pairs` to the right ones."""
    swaps = []
    for source, target in pairs:
        pattern = "^" + re.escape(source).replace(r"\{i\}", r"(\d+)") + ("" if source.endswith(".") else "$")
        swaps.append((pattern, target.replace("{i}", r"\1")))
    return swaps


SALESFORCE_VISION_SWAPS = _swaps(VISION_NAMES)
HF_VISION_SWAPS = _swaps([(hf, original) for original, hf in VISION_NAMES])
# Training-only state of the original pretrain/retrieval files; no inference model has a place for it.
SALESFORCE_TRAINING_ONLY = re.compile(
    r"^(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\.|^(image_queue|text_queue|idx_queue|queue_ptr"
    r"|ptr_queue|temp)$"
)
DECODER_WEIGHT = "text_decoder.cls.predictions.decoder.weight"
DECODER_BIAS = "text_decoder.cls.predictions.decoder.bias"
DECODER_EMBEDDINGS = "text_decoder.bert.embeddings.word_embeddings.weight"


def _rename(key: str, swaps: list[tuple[str, str]]) -> str:
    for pattern, replacement in swaps:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Take the state dict out of a training checkpoint and strip DDP/compile prefixes."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                return unwrap_state_dict(obj[key])
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict: expected a mapping of parameter names to tensors (or {'model': ...})")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def is_salesforce_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("visual_encoder.") for k in state_dict)


def convert_hf_blip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise an HF BLIP state dict: legacy LayerNorm names, position-id buffers, tied LM-head entries."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key.endswith("embeddings.position_ids") or key == DECODER_BIAS:
            continue  # a buffer we derive, and an alias of `predictions.bias`
        out[key] = value
    if DECODER_EMBEDDINGS in out:
        out.setdefault(DECODER_WEIGHT, out[DECODER_EMBEDDINGS])
    return out


def convert_salesforce_blip(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original `.pth` layout -> ours. Returns the converted dict and the training-only keys that were dropped."""
    out, dropped = {}, []
    for key, value in state_dict.items():
        if SALESFORCE_TRAINING_ONLY.search(key):
            dropped.append(key)
            continue
        out[_rename(key, SALESFORCE_VISION_SWAPS)] = value
    return convert_hf_blip(fuse_split_qkv(out)), dropped


SPLIT_QKV = re.compile(r"^(visual_encoder\.blocks\.\d+\.attn)\.(q|k|v)(?:_proj)?\.(weight|bias)$")
SPLIT_QV_BIAS = re.compile(r"^(visual_encoder\.blocks\.\d+\.attn)\.(q|v)_bias$")


def fuse_split_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ViT attention stored as separate q/k/v projections (`attn.q.weight`, `attn.q_proj.bias`, ...) or with
    separate `q_bias`/`v_bias` (no k bias, as EVA-style ViTs save it) -> one fused `attn.qkv`, rows [q | k | v]."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    out = {}
    for key, value in state_dict.items():
        if m := SPLIT_QKV.match(key):
            parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif m := SPLIT_QV_BIAS.match(key):
            parts.setdefault((m.group(1), "bias"), {})[m.group(2)] = value
        else:
            out[key] = value
    for (prefix, kind), pieces in parts.items():
        if kind == "bias" and "k" not in pieces and {"q", "v"} <= set(pieces):
            pieces["k"] = torch.zeros_like(pieces["q"])
        if set(pieces) != {"q", "k", "v"}:
            raise ValueError(f"{prefix}: split attention {kind} needs q, k and v; found {sorted(pieces)}")
        fused = _rename(f"{prefix}.qkv.{kind}", SALESFORCE_VISION_SWAPS)
        out[fused] = torch.cat([pieces["q"], pieces["k"], pieces["v"]], dim=0)
    return out


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Dispatch on signature keys: Salesforce layout or HF layout."""
    if is_salesforce_layout(state_dict):
        return convert_salesforce_blip(state_dict)
    return convert_hf_blip(state_dict), []


# A bare timm/DeiT ViT (what BLIP's pretraining starts its image encoder from): these top-level names are the ViT;
# classifier heads (`head`, `fc_norm`, `head_dist`, ...) have no place in an image encoder.
TIMM_VIT_NAMES = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")
VISION_PREFIX = "vision_model."


def vision_part(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image encoder of a checkpoint, named as our `VisionTransformer`'s own parameters (no `vision_model.`):
    from ours/HF (`vision_model.*`), the original Salesforce layout (`visual_encoder.*`) or a bare timm/DeiT ViT
    (`cls_token`, `pos_embed`, `blocks.*`, ...; heads dropped). Raises ValueError when there is none."""
    if "dist_token" in state_dict:
        raise ValueError("a distilled DeiT (with a dist_token) has two class tokens; BLIP's image encoder has one")
    if not any(k.startswith((VISION_PREFIX, "visual_encoder.")) for k in state_dict):
        state_dict = {f"visual_encoder.{k}": v for k, v in state_dict.items() if k.split(".", 1)[0] in TIMM_VIT_NAMES}
    salesforce = {k: v for k, v in state_dict.items() if k.startswith("visual_encoder.")}
    renamed = {_rename(k, SALESFORCE_VISION_SWAPS): v for k, v in fuse_split_qkv(salesforce).items()}
    renamed.update({k: v for k, v in state_dict.items() if k.startswith(VISION_PREFIX)})
    out = {k[len(VISION_PREFIX) :]: v for k, v in renamed.items() if k.startswith(VISION_PREFIX)}
    if "embeddings.class_embedding" not in out:
        raise ValueError(
            "no image encoder in this checkpoint (expected 'vision_model.*', 'visual_encoder.*' or a timm ViT's "
            "'cls_token', 'pos_embed', 'blocks.*')"
        )
    return out


def to_salesforce(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours/HF -> the original layout (tied LM-head entries written under every name, as the original saves)."""
    out = {_rename(k, HF_VISION_SWAPS): v for k, v in convert_hf_blip(state_dict).items()}
    if "text_decoder.cls.predictions.bias" in out:
        out[DECODER_BIAS] = out["text_decoder.cls.predictions.bias"]
    return out


def to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> what transformers' `save_pretrained` writes: tied LM-head entries omitted."""
    return {k: v for k, v in state_dict.items() if k not in (DECODER_WEIGHT, DECODER_BIAS)}


CONFIG_HINT = "pass the model's config.json with --config (Python: config=)"
HEAD_WIDTH = 64  # every published BLIP checkpoint: ViT-B 12 x 64, ViT-L 16 x 64, BERT-base 12 x 64


def infer_config(state_dict: dict[str, torch.Tensor], kind: str | None = None) -> BlipConfig:
    """A config for a converted state dict that came without one (original `.pth` files): shapes tell the sizes.

    The number of attention heads is not in any shape: heads are taken to be 64 wide, as in every published
    checkpoint; a width that is not a multiple of 64 cannot be such a checkpoint, and is refused (ValueError)."""
    sd = state_dict
    if "vision_model.embeddings.class_embedding" not in sd:
        raise ValueError("no vision encoder in this checkpoint (expected 'visual_encoder.*' or 'vision_model.*' keys)")
    width = sd["vision_model.embeddings.class_embedding"].shape[-1]
    patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((sd["vision_model.embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    vision = VisionConfig(
        hidden_size=width,
        intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count_layers(sd, "vision_model.encoder.layers."),
        num_attention_heads=max(1, width // HEAD_WIDTH),
        image_size=grid * patch,
        patch_size=patch,
    )
    kind = kind or infer_kind(sd)
    has_encoder = any(k.startswith("text_encoder.") for k in sd)
    prefix = "text_encoder." if has_encoder else "text_decoder.bert."
    hidden = sd[prefix + "embeddings.word_embeddings.weight"].shape[1]
    text = TextConfig(
        vocab_size=sd[prefix + "embeddings.word_embeddings.weight"].shape[0],
        hidden_size=hidden,
        encoder_hidden_size=width,
        intermediate_size=sd[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_count_layers(sd, prefix + "encoder.layer."),
        num_attention_heads=max(1, hidden // HEAD_WIDTH),
        max_position_embeddings=sd[prefix + "embeddings.position_embeddings.weight"].shape[0],
    )
    for part, size in (("vision", width), ("text", hidden)):
        if size % HEAD_WIDTH:
            raise ValueError(
                f"cannot infer the attention heads: the {part} width {size} is not a multiple of {HEAD_WIDTH} (the "
                f"head width of published BLIP checkpoints); {CONFIG_HINT}"
            )
    embed_dim = sd["vision_proj.weight"].shape[0] if "vision_proj.weight" in sd else 256
    return BlipConfig(vision=vision, text=text, kind=kind, embed_dim=embed_dim)


def infer_kind(state_dict: dict[str, torch.Tensor]) -> str:
    """caption / vqa / retrieval / pretrain / nlvr from which parts a (converted) state dict holds."""
    has_encoder = any(k.startswith("text_encoder.") for k in state_dict)
    if has_encoder and "cls_head.0.weight" in state_dict:
        return "nlvr"
    has_decoder = any(k.startswith("text_decoder.") for k in state_dict)
    has_heads = "itm_head.weight" in state_dict
    if has_decoder and has_encoder and has_heads:
        return "pretrain"
    if has_decoder and has_encoder:
        return "vqa"
    if has_encoder and has_heads:
        return "retrieval"
    if has_decoder:
        return "caption"
    raise ValueError("cannot tell the model kind: no text_encoder/text_decoder keys in this checkpoint")


# --- NLVR2 from any BLIP -------------------------------------------------------------------------------------------

SINGLE_CROSS = re.compile(r"^(text_encoder\.encoder\.layer\.\d+\.crossattention\.)(self|output\.dense)\.(.+)$")


def nlvr_from_blip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text encoder of a (converted) BLIP state dict in the NLVR2 layout, as the original initialises
    `BLIP_NLVR` from a pretrained file: each layer's single cross-attention (`crossattention.self.*`) copied to
    both `self0` and `self1`, its output projection (`crossattention.output.dense`) to `dense0` and `dense1`; the
    LayerNorm stays shared. The rest of the dict passes unchanged; `merge_layer` and `cls_head` are not made here
    (they start fresh)."""
    out = {}
    for key, value in state_dict.items():
        if m := SINGLE_CROSS.match(key):
            prefix, part, rest = m.groups()
            for twin in ("0", "1"):
                out[f"{prefix}{part}{twin}.{rest}"] = value
        else:
            out[key] = value
    return out


def _count_layers(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


# --- BLIP-2 ----------------------------------------------------------------------------------------------------------

# transformers before 4.47 kept the EVA ViT's attention bias as two vectors (no key bias); 5.x stores one qkv.bias.
BLIP2_QV_BIAS = re.compile(r"^(vision_model\.encoder\.layers\.\d+\.self_attn)\.(q|v)_bias$")


def convert_hf_blip2(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise an HF BLIP-2 state dict: separate `q_bias`/`v_bias` -> one `qkv.bias` `[q | 0 | v]`, derived
    position-id buffers dropped. Tied copies the file leaves out are filled by the loader (`fill_tied`)."""
    out, split = {}, {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if m := BLIP2_QV_BIAS.match(key):
            split.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        out[key] = value
    for prefix, pieces in split.items():
        if set(pieces) != {"q", "v"}:
            raise ValueError(f"{prefix}: a split attention bias needs q_bias and v_bias; found {sorted(pieces)}")
        out[f"{prefix}.qkv.bias"] = torch.cat([pieces["q"], torch.zeros_like(pieces["q"]), pieces["v"]])
    return out


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor in `model` (tied embeddings / LM heads), the kept name first: the one
    transformers writes (`shared` before `embed_tokens` before the rest, e.g. `lm_head`)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)

    def rank(name: str) -> tuple[int, str]:
        return (0 if ".shared." in name else 1 if "embed_tokens" in name else 2, name)

    return [sorted(names, key=rank) for names in groups.values() if len(names) > 1]


def fill_tied(state: dict[str, torch.Tensor], groups: list[list[str]]) -> dict[str, torch.Tensor]:
    """Tied names a checkpoint leaves out, filled from the one it has (transformers saves one name per tie)."""
    out = dict(state)
    for names in groups:
        present = [n for n in names if n in out]
        for name in names:
            if name not in out and present:
                out[name] = out[present[0]]
    return out


def drop_tied(state: dict[str, torch.Tensor], groups: list[list[str]]) -> dict[str, torch.Tensor]:
    """What transformers' `save_pretrained` writes: one name per tied tensor."""
    dropped = {name for names in groups for name in names[1:]}
    return {k: v for k, v in state.items() if k not in dropped}
