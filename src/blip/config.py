"""Model configuration: dataclasses, named presets, and the Hugging Face `config.json` mapping.

Field defaults are the defaults transformers uses for a field missing from a BLIP `config.json`, so a minimal hub
config (which only states what differs) resolves to the same model here and there. Note the trap in
`TextConfig.num_attention_heads`: the default is 8, while every real checkpoint uses 12
(docs/architecture.md, text transformer).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

ModelKind = Literal["caption", "vqa", "retrieval", "pretrain", "nlvr"]

# Which heads each kind of model carries, and the transformers class name for each kind.
KIND_PARTS: dict[str, tuple[str, ...]] = {
    "caption": ("text_decoder",),
    "vqa": ("text_encoder", "text_decoder"),
    "retrieval": ("text_encoder", "heads"),
    "pretrain": ("text_encoder", "text_decoder", "heads"),
    "nlvr": ("text_encoder", "cls_head"),  # the encoder with twin cross-attention (blip.models.nlvr)
}
HF_ARCHITECTURES: dict[str, str] = {
    "caption": "BlipForConditionalGeneration",
    "vqa": "BlipForQuestionAnswering",
    "retrieval": "BlipForImageTextRetrieval",
}
# Kinds transformers has no class for: saved in the same layout (config.json + model.safetensors) under our own
# architecture name, which only this package reads (docs/checkpoints.md).
OWN_ARCHITECTURES: dict[str, str] = {"nlvr": "BlipForVisualReasoning"}
SAVED_ARCHITECTURES: dict[str, str] = {**HF_ARCHITECTURES, **OWN_ARCHITECTURES}
KIND_TASKS: dict[str, frozenset[str]] = {
    "caption": frozenset({"caption"}),
    "vqa": frozenset({"vqa"}),
    "retrieval": frozenset({"itm", "itc"}),
    "pretrain": frozenset({"caption", "itm", "itc"}),
    "nlvr": frozenset({"reason"}),
}
# Kinds whose image-grounded encoder starts from `[ENC]` (= bos + 1) for ITM, as the original code trains it.
KINDS_WITH_ENC = frozenset({"retrieval", "pretrain", "nlvr"})

# Upper bounds `validate` enforces: far above every published BLIP/BLIP-2 size, far below what would exhaust memory
# before the weights are even compared with the config (e.g. the position-embedding resize allocates grid**2 * width).
MAX_WIDTH = 16_384  # hidden sizes, cross-attention and ITC widths
MAX_INTERMEDIATE = 65_536
MAX_LAYERS = 256
MAX_VOCAB = 1_048_576
MAX_TEXT_POSITIONS = 65_536
MAX_IMAGE_SIZE = 8_192  # pixels per side
MAX_PATCHES = 16_384  # (image_size / patch_size) ** 2: a 128 x 128 grid


class ConfigError(ValueError):
    """A configuration no model can be built from; the message names the field (as config.json spells it)."""


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768  # ViT width (768 base, 1024 large)
    intermediate_size: int = 3072  # MLP width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 384  # square input side in pixels
    patch_size: int = 16
    layer_norm_eps: float = 1e-5  # transformers' value; the original code used 1e-6
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, training only

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 30524  # bert-base-uncased 30522 + [DEC] + [ENC]
    hidden_size: int = 768
    encoder_hidden_size: int = 768  # width of the image tokens the cross-attention reads (= vision hidden size)
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 8  # transformers' default; real checkpoints say 12
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    bos_token_id: int = 30522  # [DEC], starts every decoder sequence
    pad_token_id: int = 0
    sep_token_id: int = 102  # [SEP], the end of every generated sequence
    label_smoothing: float = 0.0  # round-trips config.json only; training takes it from TrainConfig (0.1)


@dataclass(frozen=True)
class BlipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    kind: ModelKind = "caption"  # None only transiently, while a loader infers it from the weights
    embed_dim: int = 256  # ITC projection width (`image_text_hidden_size`)

    @property
    def enc_token_id(self) -> int:
        """[ENC]: the token the original code put at position 0 for the image-grounded encoder."""
        return self.text.bos_token_id + 1

    @property
    def tasks(self) -> frozenset[str]:
        return KIND_TASKS[self.kind]

    def replace(self, **changes: Any) -> BlipConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> BlipConfig:
        """Raise `ConfigError` naming the first field out of range (positive sizes under sane limits, heads
        dividing their width, patches dividing the image, special token ids inside the vocabulary); return self.

        Cheap and allocation-free: loaders run it before building anything from a config they were given."""
        t = self.text
        validate_vision(self.vision)

        _check_int("text_config.vocab_size", t.vocab_size, 1, MAX_VOCAB)
        _check_int("text_config.hidden_size", t.hidden_size, 1, MAX_WIDTH)
        _check_int("text_config.encoder_hidden_size", t.encoder_hidden_size, 1, MAX_WIDTH)
        _check_int("text_config.intermediate_size", t.intermediate_size, 1, MAX_INTERMEDIATE)
        _check_int("text_config.num_hidden_layers", t.num_hidden_layers, 1, MAX_LAYERS)
        _check_heads("text_config", t.num_attention_heads, t.hidden_size)
        _check_int("text_config.max_position_embeddings", t.max_position_embeddings, 2, MAX_TEXT_POSITIONS)
        _check_float("text_config.layer_norm_eps", t.layer_norm_eps, positive=True)
        _check_float("text_config.hidden_dropout_prob", t.hidden_dropout_prob, below_one=True)
        _check_float("text_config.attention_probs_dropout_prob", t.attention_probs_dropout_prob, below_one=True)
        _check_float("text_config.label_smoothing", t.label_smoothing, below_one=True)
        for name in ("bos_token_id", "pad_token_id", "sep_token_id"):
            _check_token(f"text_config.{name}", getattr(t, name), t.vocab_size)

        _check_int("image_text_hidden_size", self.embed_dim, 1, MAX_WIDTH)
        if self.kind is not None and self.kind not in KIND_PARTS:
            raise ConfigError(f"unknown model kind {self.kind!r}; expected one of {', '.join(KIND_PARTS)}")
        if self.kind in KINDS_WITH_ENC and self.enc_token_id >= t.vocab_size:
            raise ConfigError(
                f"text_config.bos_token_id = {t.bos_token_id}: a {self.kind!r} model needs [ENC] = bos_token_id + 1 "
                f"= {self.enc_token_id} inside the vocabulary of {t.vocab_size} tokens"
            )
        return self

    # --- Hugging Face config.json -----------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], kind: ModelKind | None = None) -> BlipConfig:
        """Build from a transformers `config.json` dict; missing fields take transformers' defaults."""
        if not isinstance(data, dict):
            raise ConfigError("the config is not a JSON object")
        if kind is None:
            architectures = data.get("architectures") or []
            kind = kind_from_architectures(architectures if isinstance(architectures, list) else [])
        for section in ("vision_config", "text_config"):
            if not isinstance(data.get(section) or {}, dict):
                raise ConfigError(f"{section} is not a JSON object")
        vision = _dataclass_from(VisionConfig, data.get("vision_config") or {})
        text_data = dict(data.get("text_config") or {})
        for key in ("eos_token_id",):
            text_data.pop(key, None)
        text = _dataclass_from(TextConfig, text_data)
        # transformers ties the text side's cross-attention width to the vision width.
        text = dataclasses.replace(text, encoder_hidden_size=vision.hidden_size)
        embed_dim = data.get("image_text_hidden_size", 256)
        return cls(vision=vision, text=text, kind=kind, embed_dim=embed_dim)  # kind None: let the weights tell

    def to_hf_dict(self) -> dict[str, Any]:
        """A complete `config.json` that transformers loads as the matching Blip* class."""
        if self.kind not in SAVED_ARCHITECTURES:
            raise ValueError(f"a {self.kind!r} model has no transformers class; save its parts separately")
        vision = dataclasses.asdict(self.vision)
        vision.pop("drop_path_rate")
        vision.update(model_type="blip_vision_model", hidden_act="gelu")
        text = dataclasses.asdict(self.text)
        text.update(model_type="blip_text_model", hidden_act="gelu", is_decoder=True, eos_token_id=2)
        return {
            "architectures": [SAVED_ARCHITECTURES[self.kind]],
            "model_type": "blip",
            "image_text_hidden_size": self.embed_dim,
            "projection_dim": 512,
            "logit_scale_init_value": 2.6592,
            "text_config": text,
            "vision_config": vision,
        }


def validate_vision(v: VisionConfig) -> None:
    """Raise `ConfigError` naming the first `vision_config` field out of range (BLIP's and BLIP-2's ViT)."""
    _check_int("vision_config.hidden_size", v.hidden_size, 1, MAX_WIDTH)
    _check_int("vision_config.intermediate_size", v.intermediate_size, 1, MAX_INTERMEDIATE)
    _check_int("vision_config.num_hidden_layers", v.num_hidden_layers, 1, MAX_LAYERS)
    _check_heads("vision_config", v.num_attention_heads, v.hidden_size)
    _check_int("vision_config.image_size", v.image_size, 1, MAX_IMAGE_SIZE)
    _check_int("vision_config.patch_size", v.patch_size, 1, MAX_IMAGE_SIZE)
    if v.image_size % v.patch_size:
        raise ConfigError(
            f"vision_config.patch_size = {v.patch_size} does not divide vision_config.image_size = {v.image_size}"
        )
    if v.grid_size**2 > MAX_PATCHES:
        raise ConfigError(
            f"vision_config.image_size = {v.image_size} with patch_size {v.patch_size} makes {v.grid_size**2} "
            f"patches; at most {MAX_PATCHES} are supported"
        )
    _check_float("vision_config.layer_norm_eps", v.layer_norm_eps, positive=True)
    _check_float("vision_config.attention_dropout", v.attention_dropout, below_one=True)
    _check_float("vision_config.drop_path_rate", v.drop_path_rate, below_one=True)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} = {value!r}: must be an integer")
    if not low <= value <= high:
        raise ConfigError(f"{name} = {value}: must be between {low} and {high}")


def _check_heads(section: str, heads: Any, width: int) -> None:
    _check_int(f"{section}.num_attention_heads", heads, 1, width)
    if width % heads:
        raise ConfigError(f"{section}.num_attention_heads = {heads} does not divide {section}.hidden_size = {width}")


def _check_float(name: str, value: Any, *, positive: bool = False, below_one: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} = {value!r}: must be a finite number")
    if positive and value <= 0:
        raise ConfigError(f"{name} = {value}: must be positive")
    if below_one and not 0 <= value < 1:
        raise ConfigError(f"{name} = {value}: must be in [0, 1)")


def _check_token(name: str, value: Any, vocab_size: int, vocab_name: str = "text_config.vocab_size") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} = {value!r}: must be an integer")
    if not 0 <= value < vocab_size:
        raise ConfigError(f"{name} = {value} is outside the vocabulary ({vocab_name} = {vocab_size})")


def kind_from_architectures(architectures: list[str]) -> ModelKind | None:
    for kind, name in SAVED_ARCHITECTURES.items():
        if name in architectures:
            return kind  # type: ignore[return-value]
    return None


def _dataclass_from(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in names:
            continue
        if key in ("image_size", "patch_size") and isinstance(value, list | tuple):
            if len(set(value)) != 1:
                raise ConfigError(f"non-square {key} {value} is not supported")
            value = value[0]
        values[key] = value
    return cls(**values)


# --- presets -----------------------------------------------------------------------------------------------------


def _text(**kw: Any) -> TextConfig:
    return TextConfig(num_attention_heads=12, **kw)


VISION_BASE = VisionConfig()
VISION_LARGE = VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)

PRESETS: dict[str, BlipConfig] = {
    "blip_base_caption": BlipConfig(VISION_BASE, _text(), "caption"),
    "blip_large_caption": BlipConfig(VISION_LARGE, _text(encoder_hidden_size=1024), "caption"),
    "blip_base_vqa": BlipConfig(VISION_BASE, _text(), "vqa"),
    "blip_base_retrieval": BlipConfig(VISION_BASE, _text(), "retrieval"),
    "blip_large_retrieval": BlipConfig(VISION_LARGE, _text(encoder_hidden_size=1024), "retrieval"),
    "blip_base_pretrain": BlipConfig(VisionConfig(image_size=224), _text(), "pretrain"),
    "blip_base_nlvr": BlipConfig(VISION_BASE, _text(), "nlvr"),  # model_base_nlvr.pth (384 px)
    # Tiny model for tests and the shapes world: builds in milliseconds, trains on a CPU.
    "blip_test": BlipConfig(
        VisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        TextConfig(
            vocab_size=30524,
            hidden_size=64,
            encoder_hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        ),
        "pretrain",
        embed_dim=32,
    ),
}


def get_preset(name: str, **changes: Any) -> BlipConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]
