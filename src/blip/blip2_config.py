"""BLIP-2 configuration: dataclasses for the vision encoder, the Q-Former and the two language-model families (OPT,
T5 / Flan-T5), and the Hugging Face `config.json` mapping (`model_type` "blip-2").

Field names are the ones transformers' config.json uses, and field defaults are the defaults transformers uses for
a field missing from a BLIP-2 `config.json`, so a minimal hub config resolves to the same model here and there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from blip.config import VisionConfig

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


@dataclass(frozen=True)
class OptConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None  # None: = hidden_size (350m projects 512 <-> 1024)
    num_attention_heads: int = 12
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    remove_final_layer_norm: bool = False  # config.json spells it `_remove_final_layer_norm`
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    # OPT work: from_hf_dict / to_hf_dict / validate live here.


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
