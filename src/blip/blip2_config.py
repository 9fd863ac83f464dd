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
    _check_float,
    _check_heads,
    _check_int,
    _check_token,
    _dataclass_from,
    validate_vision,
)

Blip2Kind = Literal["opt", "t5", "retrieval"]  # Blip2ForConditionalGeneration with OPT / T5, Blip2ForImageTextRetrieval
BLIP2_KIND_TASKS: dict[str, frozenset[str]] = {
    "opt": frozenset({"caption", "vqa"}),
    "t5": frozenset({"caption", "vqa"}),
    "retrieval": frozenset({"itm", "itc"}),
}
BLIP2_ARCHITECTURES: dict[str, str] = {
    "opt": "Blip2ForConditionalGeneration",
    "t5": "Blip2ForConditionalGeneration",
    "retrieval": "Blip2ForImageTextRetrieval",
}
MAX_QUERY_TOKENS = 4096


@dataclass(frozen=True)
class Blip2VisionConfig(VisionConfig):
    """EVA ViT-g/14 as BLIP-2 uses it (39 of its 40 layers): BLIP's ViT modules with LayerNorm eps 1e-6 and the
    attention bias of transformers 5: one fused `qkv.bias` (older files: `q_bias` and `v_bias`, fused with a zero
    k bias by `blip.weights.convert`); `qkv_bias` false means no bias at all."""

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

    @property
    def tasks(self) -> frozenset[str]:
        return BLIP2_KIND_TASKS[self.kind]

    @property
    def embed_dim(self) -> int:
        """The ITC feature width, as `BlipConfig.embed_dim` names it (each of the Q query features has this width)."""
        return self.image_text_hidden_size

    @property
    def lm_width(self) -> int:
        """The language model's input width (what `language_projection` maps the query outputs to)."""
        return self.text.d_model if isinstance(self.text, T5Config) else self.text.hidden_size

    def validate(self) -> Blip2Config:
        """Raise `ConfigError` naming the first field out of range (as config.json spells it); return self."""
        if self.kind not in BLIP2_KIND_TASKS:
            raise ConfigError(f"unknown BLIP-2 kind {self.kind!r}; expected one of {', '.join(BLIP2_KIND_TASKS)}")
        _validate_vision(self.vision)
        q = self.qformer
        _check_int("qformer_config.vocab_size", q.vocab_size, 1, MAX_VOCAB)
        _check_int("qformer_config.hidden_size", q.hidden_size, 1, MAX_WIDTH)
        _check_int("qformer_config.num_hidden_layers", q.num_hidden_layers, 1, MAX_LAYERS)
        _check_heads("qformer_config", q.num_attention_heads, q.hidden_size)
        _check_int("qformer_config.intermediate_size", q.intermediate_size, 1, MAX_INTERMEDIATE)
        _check_int("qformer_config.max_position_embeddings", q.max_position_embeddings, 2, MAX_TEXT_POSITIONS)
        _check_float("qformer_config.layer_norm_eps", q.layer_norm_eps, positive=True)
        _check_float("qformer_config.hidden_dropout_prob", q.hidden_dropout_prob, below_one=True)
        _check_float("qformer_config.attention_probs_dropout_prob", q.attention_probs_dropout_prob, below_one=True)
        _check_int("qformer_config.cross_attention_frequency", q.cross_attention_frequency, 1, MAX_LAYERS)
        _check_int("qformer_config.encoder_hidden_size", q.encoder_hidden_size, 1, MAX_WIDTH)
        _check_token("qformer_config.pad_token_id", q.pad_token_id, q.vocab_size, "qformer_config.vocab_size")
        if q.encoder_hidden_size != self.vision.hidden_size:
            raise ConfigError(
                f"qformer_config.encoder_hidden_size = {q.encoder_hidden_size} differs from vision_config.hidden_size "
                f"= {self.vision.hidden_size}"
            )
        _check_int("num_query_tokens", self.num_query_tokens, 1, MAX_QUERY_TOKENS)
        _check_int("image_text_hidden_size", self.image_text_hidden_size, 1, MAX_WIDTH)
        if self.image_token_index is not None:
            _check_int("image_token_index", self.image_token_index, 0, MAX_VOCAB)
        if self.kind == "retrieval":
            if not q.use_qformer_text_input:
                raise ConfigError(
                    "qformer_config.use_qformer_text_input = false: a retrieval model (Blip2ForImageTextRetrieval) "
                    "reads text through the Q-Former and needs it true"
                )
            return self
        expected = T5Config if self.kind == "t5" else OptConfig
        if not isinstance(self.text, expected):
            raise ConfigError(f"text_config: a {self.kind!r} BLIP-2 model needs a {expected.__name__}")
        self.text.validate()
        vocab = self.text.vocab_size
        if self.image_token_index is not None and self.image_token_index >= vocab:
            raise ConfigError(
                f"image_token_index = {self.image_token_index} is outside the language model's vocabulary "
                f"(text_config.vocab_size = {vocab})"
            )
        return self

    # --- Hugging Face config.json -----------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], kind: Blip2Kind | None = None) -> Blip2Config:
        """Build from a transformers `config.json` dict (model_type "blip-2"); missing fields take transformers'
        defaults (OPT when there is no text_config, 32 query tokens, no image token)."""
        if not isinstance(data, dict):
            raise ConfigError("the config is not a JSON object")
        if data.get("model_type", "blip-2") != "blip-2":
            raise ConfigError(f"model_type {data.get('model_type')!r} is not a BLIP-2 model (expected 'blip-2')")
        for section in ("vision_config", "qformer_config", "text_config"):
            if not isinstance(data.get(section) or {}, dict):
                raise ConfigError(f"{section} is not a JSON object")
        text_data = dict(data.get("text_config") or {})
        text_type = text_data.get("model_type", "opt")
        if kind is None:
            architectures = data.get("architectures") or []
            if isinstance(architectures, list) and "Blip2ForImageTextRetrieval" in architectures:
                kind = "retrieval"
            elif text_type in ("t5", "mt5", "umt5"):
                kind = "t5"
            elif text_type == "opt":
                kind = "opt"
            else:
                raise ConfigError(
                    f"text_config.model_type = {text_type!r}: only OPT and T5 language models are supported"
                )
        if kind not in BLIP2_KIND_TASKS:
            raise ConfigError(f"unknown BLIP-2 kind {kind!r}; expected one of {', '.join(BLIP2_KIND_TASKS)}")
        vision = _dataclass_from(Blip2VisionConfig, data.get("vision_config") or {})
        qformer = _dataclass_from(QFormerConfig, data.get("qformer_config") or {})
        qformer = dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size)  # as transformers does
        text: OptConfig | T5Config | None = None
        if kind != "retrieval":
            if (kind == "t5") != (text_type in ("t5", "mt5", "umt5")):
                raise ConfigError(f"text_config.model_type = {text_type!r} does not fit a {kind!r} BLIP-2 model")
            text = (T5Config if kind == "t5" else OptConfig).from_hf_dict(text_data)
        defaults = cls()
        return cls(
            vision=vision,
            qformer=qformer,
            text=text,
            kind=kind,
            num_query_tokens=data.get("num_query_tokens", defaults.num_query_tokens),
            image_text_hidden_size=data.get("image_text_hidden_size", defaults.image_text_hidden_size),
            image_token_index=data.get("image_token_index", data.get("image_token_id")),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A complete `config.json` that transformers loads as Blip2ForConditionalGeneration (OPT / T5) or
        Blip2ForImageTextRetrieval."""
        vision = dataclasses.asdict(self.vision)
        vision.pop("drop_path_rate")
        vision.update(model_type="blip_2_vision_model", hidden_act="gelu")
        qformer = dataclasses.asdict(self.qformer)
        qformer.update(model_type="blip_2_qformer", hidden_act="gelu")
        data: dict[str, Any] = {
            "architectures": [BLIP2_ARCHITECTURES[self.kind]],
            "model_type": "blip-2",
            "num_query_tokens": self.num_query_tokens,
            "image_text_hidden_size": self.image_text_hidden_size,
            "image_token_index": self.image_token_index,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "vision_config": vision,
            "qformer_config": qformer,
        }
        if self.text is not None:
            data["text_config"] = self.text.to_hf_dict()
            data["use_decoder_only_language_model"] = self.kind == "opt"
        return data


# --- T5 / Flan-T5 (encoder-decoder) ---------------------------------------------------------------------------------


# Activations the T5 feed-forward supports (`feed_forward_proj` = "<act>" or "gated-<act>"); transformers' names.
T5_ACTIVATIONS = frozenset(
    {"relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh", "quick_gelu", "silu", "swish"}
    | {"tanh", "sigmoid"}
)
MAX_RELATIVE_BUCKETS = 4096
MAX_RELATIVE_DISTANCE = 1_048_576


@dataclass(frozen=True)
class T5Config:
    """T5 / Flan-T5 as transformers' `T5Config` describes it (`model_type` "t5").

    The head: transformers 5 scales the decoder output by `d_model ** -0.5` unless the config says
    `tie_word_embeddings: false` (T5 v1.1 / Flan-T5), and it writes that choice back as `scale_decoder_outputs`
    (while always writing `tie_word_embeddings: true`). Whether `lm_head` is a separate matrix is decided by the
    weights, not the config: transformers ties it to `shared` unless the checkpoint holds an `lm_head.weight` that
    differs. `from_hf_dict` takes `tie_word_embeddings` = the scaling (the published pairs: T5 tied + scaled, Flan-T5
    untied + unscaled); `blip.models.blip2.t5.hf_t5_state_dict` then settles the tie from the tensors, as transformers
    does.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per-head width; num_heads * d_kv need not equal d_model
    d_ff: int = 2048
    num_layers: int = 6  # encoder blocks
    num_decoder_layers: int | None = None  # None: = num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu", "gelu", "gated-gelu" (Flan-T5: gelu_new, gated), "gated-silu", ...
    tie_word_embeddings: bool = True  # lm_head is `shared`; Flan-T5 says False (a separate lm_head)
    scale_decoder_outputs: bool | None = (
        None  # decoder output * d_model**-0.5 before lm_head; None: = tie_word_embeddings
    )
    dropout_rate: float = 0.1  # transformers' default; only matters in training mode
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        """The activation's transformers name; "gated-gelu" means the tanh approximation ("gelu_new")."""
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def scales_outputs(self) -> bool:
        return self.tie_word_embeddings if self.scale_decoder_outputs is None else self.scale_decoder_outputs

    def replace(self, **changes: Any) -> T5Config:
        return dataclasses.replace(self, **changes)

    def validate(self) -> T5Config:
        """Raise `ConfigError` naming the first `text_config` field no model can be built from; return self."""
        _check_int("text_config.vocab_size", self.vocab_size, 1, MAX_VOCAB)
        _check_int("text_config.d_model", self.d_model, 1, MAX_WIDTH)
        _check_int("text_config.d_kv", self.d_kv, 1, MAX_WIDTH)
        _check_int("text_config.num_heads", self.num_heads, 1, MAX_WIDTH)
        if self.num_heads * self.d_kv > MAX_WIDTH:
            raise ConfigError(
                f"text_config.num_heads = {self.num_heads} with d_kv {self.d_kv} makes an attention width of "
                f"{self.num_heads * self.d_kv}; at most {MAX_WIDTH} is supported"
            )
        _check_int("text_config.d_ff", self.d_ff, 1, MAX_INTERMEDIATE)
        _check_int("text_config.num_layers", self.num_layers, 1, MAX_LAYERS)
        if self.num_decoder_layers is not None:
            _check_int("text_config.num_decoder_layers", self.num_decoder_layers, 1, MAX_LAYERS)
        buckets = self.relative_attention_num_buckets
        # The encoder's bidirectional buckets give each direction buckets // 2, half of them exact: at least one.
        _check_int("text_config.relative_attention_num_buckets", buckets, 4, MAX_RELATIVE_BUCKETS)
        distance = self.relative_attention_max_distance
        _check_int("text_config.relative_attention_max_distance", distance, 1, MAX_RELATIVE_DISTANCE)
        if distance <= buckets // 2:
            raise ConfigError(
                f"text_config.relative_attention_max_distance = {distance} must exceed the exact buckets, "
                f"relative_attention_num_buckets // 2 = {buckets // 2}"
            )
        _check_float("text_config.layer_norm_epsilon", self.layer_norm_epsilon, positive=True)
        _check_float("text_config.dropout_rate", self.dropout_rate, below_one=True)
        proj = self.feed_forward_proj
        if not isinstance(proj, str):
            raise ConfigError(f"text_config.feed_forward_proj = {proj!r}: must be a string")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.dense_act_fn not in T5_ACTIVATIONS:
            raise ConfigError(
                f"text_config.feed_forward_proj = {proj!r}: expected '<activation>' or 'gated-<activation>' with "
                f"an activation among {', '.join(sorted(T5_ACTIVATIONS))}"
            )
        for name in ("tie_word_embeddings", "scale_decoder_outputs"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name == "scale_decoder_outputs"):
                raise ConfigError(f"text_config.{name} = {value!r}: must be true or false")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            _check_token(f"text_config.{name}", getattr(self, name), self.vocab_size)
        return self

    # --- Hugging Face config.json (the `text_config` section) -------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> T5Config:
        """Build from a transformers T5 config dict; missing fields take transformers' defaults, resolved (the
        decoder depth, the activation, the output scaling) the way transformers resolves them."""
        if not isinstance(data, dict):
            raise ConfigError("text_config is not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        if values.get("num_decoder_layers") is None:
            values["num_decoder_layers"] = values.get("num_layers", cls.num_layers)
        # transformers 5 writes the activation it resolved next to `feed_forward_proj`, and those keys win.
        proj = values.get("feed_forward_proj", cls.feed_forward_proj)
        if isinstance(proj, str) and ("dense_act_fn" in data or "is_gated_act" in data):
            parsed = cls(feed_forward_proj=proj)
            act = data.get("dense_act_fn", parsed.dense_act_fn)
            gated = data.get("is_gated_act", parsed.is_gated_act)
            if (act, gated) != (parsed.dense_act_fn, parsed.is_gated_act):
                values["feed_forward_proj"] = f"gated-{act}" if gated is True else act
        # Scaling: `scale_decoder_outputs` when written (transformers 5), else "unless tie_word_embeddings is false".
        scale = data.get("scale_decoder_outputs")
        if scale is None:
            scale = data.get("tie_word_embeddings") is not False
        values["scale_decoder_outputs"] = scale
        values["tie_word_embeddings"] = scale
        eos = values.get("eos_token_id", cls.eos_token_id)
        if isinstance(eos, list):
            if len(eos) != 1:
                raise ConfigError(f"text_config.eos_token_id = {eos}: exactly one end token is supported")
            values["eos_token_id"] = eos[0]
        return cls(**values)

    def to_hf_dict(self) -> dict[str, Any]:
        """A complete `model_type: "t5"` config that transformers reads back into the same model."""
        data = dataclasses.asdict(self)
        data.update(
            model_type="t5",
            num_decoder_layers=self.decoder_layers,
            dense_act_fn=self.dense_act_fn,
            is_gated_act=self.is_gated_act,
            scale_decoder_outputs=self.scales_outputs,
            is_encoder_decoder=True,
        )
        return data


# --- helpers ---------------------------------------------------------------------------------------------------------


def _validate_vision(v: Blip2VisionConfig) -> None:
    validate_vision(v)
    if not isinstance(v.qkv_bias, bool):
        raise ConfigError(f"vision_config.qkv_bias = {v.qkv_bias!r}: must be true or false")
