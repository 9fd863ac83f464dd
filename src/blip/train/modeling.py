"""Models for training: random init from a preset, start from a checkpoint, share text layers, export parts.

- `build_model(cfg)`: the `BlipModel` and tokenizer a run starts from — random init (preset + size overrides +
  tokenizer) or `init=` (a training checkpoint, an HF folder, a `.pth` or a hub id), reduced to the task's kind.
- `tie_text_layers(model)`: pretraining shares every text parameter between the encoder and the decoder except
  the self-attention layers (the paper, §3.1).
- `model_for_kind(model, kind)`: the caption / vqa / retrieval model inside a pretrained one (a VQA model takes the
  pretrain encoder as its question encoder and the pretrain decoder as its answer decoder).
- `load_trained(path)`: a `Blip` (model + tokenizer + preprocessing) from a training checkpoint or any checkpoint
  `blip.load` reads; `save_hf(blip, folder)` writes the transformers layout.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blip.config import KIND_PARTS, BlipConfig, get_preset
from blip.models.blip import BlipModel
from blip.models.init import init_weights
from blip.models.vit import resize_pos_embed
from blip.tokenizer import BlipTokenizer
from blip.train.checkpoint import config_from_dict, is_training_checkpoint, load_checkpoint, tokenizer_from_dict

if TYPE_CHECKING:
    from blip.api import Blip
    from blip.train.config import TrainConfig

_logger = logging.getLogger(__name__)

POS_EMBED = "vision_model.embeddings.position_embedding"


class ModelInitError(ValueError):
    """A start checkpoint that cannot provide the model the task needs."""


def tie_text_layers(model: BlipModel) -> None:
    """Make the decoder use the encoder's embeddings, cross-attention and feed-forward modules (all but self-attention);
    the LM head stays tied to the (now shared) word embeddings."""
    if model.text_encoder is None or model.text_decoder is None:
        raise ValueError("sharing text layers needs a model with both a text encoder and a decoder (pretrain)")
    encoder, decoder = model.text_encoder, model.text_decoder.bert
    decoder.embeddings = encoder.embeddings
    for enc_layer, dec_layer in zip(encoder.layers, decoder.layers, strict=True):
        dec_layer.crossattention = enc_layer.crossattention
        dec_layer.intermediate = enc_layer.intermediate
        dec_layer.output = enc_layer.output
    model.text_decoder.tie_weights()


def _part_prefixes(kind: str) -> tuple[str, ...]:
    parts = KIND_PARTS[kind]
    prefixes = ["vision_model."]
    if "text_encoder" in parts:
        prefixes.append("text_encoder.")
    if "text_decoder" in parts:
        prefixes.append("text_decoder.")
    if "heads" in parts:
        prefixes += ["vision_proj.", "text_proj.", "itm_head."]
    return tuple(prefixes)


def model_for_kind(model: BlipModel, kind: str) -> BlipModel:
    """A new `kind` model holding `model`'s matching parts (a copy; `model` is left as it is).

    Every parameter of the new model must come from `model`, except the VQA answer decoder's cross-attention
    keys/values when the text width differs from the image width (they read question states, not image tokens):
    those start fresh, with a warning."""
    source = model.state_dict()
    target = BlipModel(model.config.replace(kind=kind))
    init_weights(target)
    expected = target.state_dict()
    missing = [k for k in expected if k not in source]
    if missing:
        have = model.config.kind
        raise ModelInitError(
            f"a {kind!r} model cannot be made from a {have!r} model: it lacks {len(missing)} parameters "
            f"(e.g. {', '.join(missing[:3])})"
        )
    state, fresh = {}, []
    for key, value in expected.items():
        if source[key].shape == value.shape:
            state[key] = source[key].detach().clone()
        else:
            state[key] = value
            fresh.append(key)
    if fresh:
        _logger.warning("%s: %d parameters start fresh (shape differs), e.g. %s", kind, len(fresh), fresh[0])
    target.load_state_dict(state, strict=True)
    if target.text_decoder is not None:
        target.text_decoder.tie_weights()
    return target.to(next(model.parameters()).device)


def with_image_size(model: BlipModel, image_size: int) -> BlipModel:
    if not image_size or image_size == model.config.vision.image_size:
        return model
    config = model.config.replace(vision=dataclasses.replace(model.config.vision, image_size=image_size))
    state = model.state_dict()
    state[POS_EMBED] = resize_pos_embed(state[POS_EMBED], config.vision.grid_size)
    resized = BlipModel(config)
    resized.load_state_dict(state, strict=True)
    if resized.text_decoder is not None:
        resized.text_decoder.tie_weights()
    return resized


def _apply_dropout(config: BlipConfig, cfg: TrainConfig) -> BlipConfig:
    text = dataclasses.replace(config.text, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    vision = dataclasses.replace(config.vision, drop_path_rate=cfg.drop_path)
    return config.replace(text=text, vision=vision)


def _rebuilt(model: BlipModel, config: BlipConfig) -> BlipModel:
    """The same weights in a model built from `config` (which may only differ in training-time fields)."""
    if config == model.config:
        return model
    new = BlipModel(config)
    new.load_state_dict(model.state_dict(), strict=True)
    if new.text_decoder is not None:
        new.text_decoder.tie_weights()
    return new


def build_tokenizer(spec: str) -> BlipTokenizer:
    if spec == "shapes":
        from blip.data.vocab import shapes_tokenizer

        return shapes_tokenizer()
    path = Path(spec).expanduser()
    if path.exists():
        return BlipTokenizer.from_pretrained(path)
    from blip.weights.load import locate

    return BlipTokenizer.from_pretrained(locate(spec))


def random_config(cfg: TrainConfig, tokenizer: BlipTokenizer) -> BlipConfig:
    """The preset with the run's size overrides, resized to the tokenizer."""
    from blip.data.vocab import config_for

    base = get_preset(cfg.preset)
    v, t = base.vision, base.text
    vision_width = cfg.vision_width or v.hidden_size
    text_width = cfg.text_width or t.hidden_size
    vision = dataclasses.replace(
        v,
        hidden_size=vision_width,
        intermediate_size=4 * vision_width if cfg.vision_width else v.intermediate_size,
        num_hidden_layers=cfg.vision_layers or v.num_hidden_layers,
        num_attention_heads=cfg.vision_heads or v.num_attention_heads,
        image_size=cfg.image_size or v.image_size,
        patch_size=cfg.patch_size or v.patch_size,
    )
    text = dataclasses.replace(
        t,
        hidden_size=text_width,
        encoder_hidden_size=vision_width,
        intermediate_size=4 * text_width if cfg.text_width else t.intermediate_size,
        num_hidden_layers=cfg.text_layers or t.num_hidden_layers,
        num_attention_heads=cfg.text_heads or t.num_attention_heads,
    )
    config = base.replace(vision=vision, text=text, kind=cfg.model_kind, embed_dim=cfg.embed_dim or base.embed_dim)
    if vision.image_size % vision.patch_size:
        raise ModelInitError(f"image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}")
    return config_for(tokenizer, config)


def load_start_model(source: str, tokenizer: str = "") -> tuple[BlipModel, BlipTokenizer]:
    """The model and tokenizer in any checkpoint: ours (.pt, self-describing) or what `blip.load` reads."""
    if is_training_checkpoint(source):
        ckpt = load_checkpoint(source)
        config = config_from_dict(ckpt["model_config"])
        with torch.device("meta"):
            model = BlipModel(config)
        model.load_state_dict(ckpt["model"], strict=True, assign=True)
        if model.text_decoder is not None:
            model.text_decoder.tie_weights()
        tok = build_tokenizer(tokenizer) if tokenizer else tokenizer_from_dict(ckpt["tokenizer"], source=source)
        return model, tok
    import blip

    loaded = blip.load(source, tokenizer=tokenizer or None)
    return loaded.model, loaded.tokenizer


def build_model(cfg: TrainConfig) -> tuple[BlipModel, BlipTokenizer]:
    """The model (task kind, training-time dropout) and tokenizer a run starts from. Random init uses the current
    torch seed."""
    if cfg.init:
        model, tokenizer = load_start_model(cfg.init, "" if cfg.vocab == "shapes" else cfg.vocab)
        if model.config.kind != cfg.model_kind:
            model = model_for_kind(model, cfg.model_kind)
        model = with_image_size(model, cfg.image_size)
    else:
        tokenizer = build_tokenizer(cfg.vocab)
        model = BlipModel(random_config(cfg, tokenizer))
        init_weights(model, std=cfg.init_std)
    model = _rebuilt(model, _apply_dropout(model.config, cfg))
    if cfg.task == "pretrain" and cfg.share_text_layers:
        tie_text_layers(model)
    if cfg.grad_checkpointing:
        model.vision_model.encoder.gradient_checkpointing = True
    return model, tokenizer


def inference_config(config: BlipConfig) -> BlipConfig:
    """`config` without training-only settings (dropout, stochastic depth)."""
    text = dataclasses.replace(config.text, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return config.replace(text=text, vision=dataclasses.replace(config.vision, drop_path_rate=0.0))


def as_blip(model: BlipModel, tokenizer: BlipTokenizer, *, source: str = "(trained)", batch_size: int = 16) -> Blip:
    """Wrap a trained model for inference (eval mode, no dropout, its own copy of the weights)."""
    from blip.api import Blip
    from blip.transforms import ImageTransform

    clean = _rebuilt(model, inference_config(model.config))
    if clean is model:
        clean = BlipModel(model.config)
        clean.load_state_dict(model.state_dict(), strict=True)
        if clean.text_decoder is not None:
            clean.text_decoder.tie_weights()
    clean.to(next(model.parameters()).device).eval()
    transform = ImageTransform(image_size=model.config.vision.image_size)
    return Blip(clean, tokenizer, transform, source=source, batch_size=batch_size)


def load_trained(
    source: str | Path, *, kind: str | None = None, device: str = "cpu", tokenizer: str = "", batch_size: int = 16
) -> Blip:
    """A `Blip` from a training checkpoint (any kind; `kind` takes a part out of a pretrain model) or from anything
    `blip.load` reads."""
    model, tok = load_start_model(str(source), tokenizer)
    if kind is not None and kind != model.config.kind:
        model = model_for_kind(model, kind)
    blip_model = as_blip(model.to(device), tok, source=str(source), batch_size=batch_size)
    return blip_model


def save_hf(blip_model: Blip, folder: str | Path) -> Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer, preprocessor) that `blip.load` and transformers
    read; the model kind must be caption, vqa or retrieval."""
    folder = Path(folder)
    blip_model.save(folder)
    return folder
