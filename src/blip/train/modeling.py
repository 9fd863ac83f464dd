"""Models for training: random init from a preset, training-time dropout, shared text layers.

- `build_model(cfg)`: the `BlipModel` and tokenizer a run starts from — random init (preset + size overrides +
  tokenizer) or `init=` (anything `blip.load` reads: a training checkpoint, an HF folder, a `.pth` or a hub id),
  reduced to the task's kind by the one load path (`blip.weights.load`).
- `tie_text_layers(model)`: pretraining shares every text parameter between the encoder and the decoder except
  the self-attention layers (the paper, §3.1).

Wrapping a trained model for inference is `blip.Blip.from_model`; taking a part out of a model in memory is
`blip.weights.load.model_for_kind`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from blip.config import BlipConfig, ConfigError, get_preset
from blip.models.blip import BlipModel
from blip.models.init import init_weights
from blip.models.kernels import unpack_linears
from blip.tokenizer import BlipTokenizer

if TYPE_CHECKING:
    from blip.train.config import TrainConfig

_logger = logging.getLogger(__name__)


class ModelInitError(ValueError):
    """A run's model that cannot be built (sizes that do not fit together)."""


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
    try:
        return config_for(tokenizer, config).validate()
    except ConfigError as e:
        raise ModelInitError(f"the model config of this run is not valid: {e}") from e


def load_vision_init(model: BlipModel, source: str) -> None:
    """Replace `model`'s image encoder by `source`'s (`blip.weights.load.load_vision_weights`), every tensor of it."""
    from blip.weights.errors import CheckpointError
    from blip.weights.load import check_keys, load_vision_weights

    vision = model.vision_model
    state = load_vision_weights(source, vision.config.image_size // vision.config.patch_size)
    try:
        check_keys(vision, state, source, "this run's image encoder")
    except CheckpointError as e:
        raise ModelInitError(
            f"vision_init={source}: {e}; where shapes differ, set this run's vision sizes to the checkpoint's"
        ) from e
    vision.load_state_dict(state)
    _logger.info("image encoder from %s", source)


def build_model(cfg: TrainConfig) -> tuple[BlipModel, BlipTokenizer]:
    """The model (task kind, training-time dropout) and tokenizer a run starts from. Random init uses the current
    torch seed."""
    if cfg.init:
        from blip.api import load

        tokenizer_source = None if cfg.vocab in ("", "shapes") else cfg.vocab
        start = load(cfg.init, kind=cfg.model_kind, image_size=cfg.image_size or None, tokenizer=tokenizer_source)
        model, tokenizer = start.model, start.tokenizer
        unpack_linears(model)  # load packs a CPU model's linears for inference: frozen, no weight gradients
    else:
        tokenizer = build_tokenizer(cfg.vocab)
        model = BlipModel(random_config(cfg, tokenizer))
        init_weights(model, std=cfg.init_std, positions=cfg.pos_init)
        if cfg.vision_init:
            load_vision_init(model, cfg.vision_init)
    model = _rebuilt(model, _apply_dropout(model.config, cfg))
    if cfg.task == "pretrain" and cfg.share_text_layers:
        tie_text_layers(model)
    if cfg.grad_checkpointing:
        model.vision_model.encoder.gradient_checkpointing = True
    return model, tokenizer
