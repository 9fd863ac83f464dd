"""BLIP-2 configuration: dataclasses for the vision encoder, the Q-Former and the two language-model families (OPT,
T5 / Flan-T5), and the Hugging Face `config.json` mapping (`model_type` "blip-2").

Field names are the ones transformers' config.json uses, and field defaults are the defaults transformers uses for
a field missing from a BLIP-2 `config.json`, so a minimal hub config resolves to the same model here and there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from blip.config import (
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_TEXT_POSITIONS,
    MAX_VOCAB,
    MAX_WIDTH,
    ConfigError,
    VisionConfig,
    _check_heads,
    _check_int,
    _check_token,
)

Blip2Kind = Literal["opt", "t5", "retrieval"]  # Blip2ForConditionalGeneration with OPT / T5, Blip2ForImageTextRetrieval


@dataclass(frozen=True)
class Blip2VisionConfig(VisionConfig):
    """EVA ViT-g/14 as BLIP-2 uses it (39 of its 40 layers). Same modules as BLIP's ViT except the attention's
    q/v biases, stored as two vectors (`q_bias`, `v_bias`; the k bias is zero) instead of one qkv bias."""

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True


# --- OPT (decoder-only) -------------------------------------------------------------------------------------------

# transformers' activation names the OPT model implements (`blip.models.blip2.opt.ACTIVATIONS` maps them).
OPT_ACTIVATIONS = (
    "relu",
    "relu2",
    "relu6",
    "gelu",
    "gelu_python",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "silu",
    "swish",
    "mish",
    "tanh",
    "sigmoid",
    "linear",
)


@dataclass(frozen=True)
class OptConfig:
    vocab_size: int = 50272
    hidden_size: int = 768  # decoder width
    num_hidden_layers: int = 12
    ffn_dim: int = 3072  # MLP width
    max_position_embeddings: int = 2048  # learned positions (the table has 2 more rows: OPT's offset)
    do_layer_norm_before: bool = True  # pre-LN; False is post-LN (opt-350m), which also drops the final LayerNorm
    word_embed_proj_dim: int | None = None  # None: = hidden_size (350m projects 512 <-> 1024)
    num_attention_heads: int = 12
    activation_function: str = "relu"  # one of OPT_ACTIVATIONS
    enable_bias: bool = True  # biases of the attention and MLP projections
    layer_norm_elementwise_affine: bool = True  # LayerNorms with weight and bias
    remove_final_layer_norm: bool = False  # config.json spells it `_remove_final_layer_norm`
    tie_word_embeddings: bool = True  # lm_head shares the token embedding matrix
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2  # config.json may list several; the first is kept

    @property
    def word_embed_dim(self) -> int:
        """Width of the token embeddings, of `inputs_embeds` and of the LM head's input (`word_embed_proj_dim`)."""
        return self.hidden_size if self.word_embed_proj_dim is None else self.word_embed_proj_dim

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    def replace(self, **changes: Any) -> OptConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> OptConfig:
        """Raise `ConfigError` naming the first bad field (`text_config.<name>`); return self. Allocation-free."""
        s = "text_config"
        _check_int(f"{s}.vocab_size", self.vocab_size, 1, MAX_VOCAB)
        _check_int(f"{s}.hidden_size", self.hidden_size, 1, MAX_WIDTH)
        _check_int(f"{s}.num_hidden_layers", self.num_hidden_layers, 1, MAX_LAYERS)
        _check_int(f"{s}.ffn_dim", self.ffn_dim, 1, MAX_INTERMEDIATE)
        _check_int(f"{s}.max_position_embeddings", self.max_position_embeddings, 1, MAX_TEXT_POSITIONS)
        if self.word_embed_proj_dim is not None:
            _check_int(f"{s}.word_embed_proj_dim", self.word_embed_proj_dim, 1, MAX_WIDTH)
        _check_heads(s, self.num_attention_heads, self.hidden_size)
        if self.activation_function not in OPT_ACTIVATIONS:
            raise ConfigError(
                f"{s}.activation_function = {self.activation_function!r}: expected one of {', '.join(OPT_ACTIVATIONS)}"
            )
        for name in (
            "do_layer_norm_before",
            "enable_bias",
            "layer_norm_elementwise_affine",
            "remove_final_layer_norm",
            "tie_word_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, bool):
                key = "_remove_final_layer_norm" if name == "remove_final_layer_norm" else name
                raise ConfigError(f"{s}.{key} = {value!r}: must be true or false")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self, name) is not None:
                _check_token(f"{s}.{name}", getattr(self, name), self.vocab_size)
        return self

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> OptConfig:
        """Build from an OPT `config.json` dict (a BLIP-2 `text_config`); missing fields take transformers' defaults.
        Token ids given as lists keep their first element (an empty list is None)."""
        if not isinstance(data, dict):
            raise ConfigError("text_config is not a JSON object")
        model_type = data.get("model_type", "opt")
        if model_type != "opt":
            raise ConfigError(f"text_config.model_type = {model_type!r}: expected 'opt'")
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = "remove_final_layer_norm" if key == "_remove_final_layer_norm" else key
            if name not in names:
                continue
            if name.endswith("_token_id") and isinstance(value, list | tuple):
                value = value[0] if value else None
            values[name] = value
        return cls(**values)

    def to_hf_dict(self) -> dict[str, Any]:
        """A complete OPT `config.json` dict (`model_type` "opt") that transformers reads back as this model; the
        training-only fields carry transformers' defaults."""
        data = dataclasses.asdict(self)
        data["_remove_final_layer_norm"] = data.pop("remove_final_layer_norm")
        data["word_embed_proj_dim"] = self.word_embed_dim
        data.update(dropout=0.1, attention_dropout=0.0, layerdrop=0.0, init_std=0.02, use_cache=True)
        return {"architectures": ["OPTForCausalLM"], "model_type": "opt", **data}


# --- Q-Former ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QFormerConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2  # layer i cross-attends to the image when i % frequency == 0
    encoder_hidden_size: int = 1408  # = the vision width (transformers overwrites it with vision_config.hidden_size)
    use_qformer_text_input: bool = False
    hidden_dropout_prob: float = 0.0  # inference: transformers' 0.1 defaults only matter for training
    attention_probs_dropout_prob: float = 0.0


@dataclass(frozen=True)
class Blip2Config:
    vision: Blip2VisionConfig = field(default_factory=Blip2VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: OptConfig | T5Config | None = None  # None for the retrieval model
    kind: Blip2Kind = "opt"
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256  # ITC projection width (retrieval)
    image_token_index: int | None = None  # the `<image>` placeholder id in the LM's vocabulary (None: not used)

    def replace(self, **changes: Any) -> Blip2Config:
        return dataclasses.replace(self, **changes)

    # Vision + Q-Former work: tasks, validate, from_hf_dict / to_hf_dict (dispatching the text side to
    # OptConfig / T5Config) live here.


# --- T5 / Flan-T5 (encoder-decoder) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: = num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu", "gelu", "gated-gelu" (Flan-T5: gelu_new, gated), ...
    tie_word_embeddings: bool = True  # Flan-T5 says False: separate lm_head, no d_model**-0.5 output scaling
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # T5 work: from_hf_dict / to_hf_dict / validate live here.
