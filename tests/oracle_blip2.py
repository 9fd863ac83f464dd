"""transformers as a test oracle for BLIP-2: build random-weight `Blip2ForConditionalGeneration` (OPT or T5 language
model) and `Blip2ForImageTextRetrieval` checkpoints of any shape, saved with their processor as a hub folder.

Only tests import this module; transformers is a dev dependency, never a runtime one. The generation work reuses
`Blip2Spec`, `build_blip2_checkpoint` and `hf_blip2_load`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from oracle import write_vocab

HF_CLASSES = {"opt": "Blip2ForConditionalGeneration", "t5": "Blip2ForConditionalGeneration"}
HF_CLASSES["retrieval"] = "Blip2ForImageTextRetrieval"


@dataclass
class Blip2Spec:
    kind: str = "opt"  # opt | t5 | retrieval
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_mlp: int = 48
    image_size: int = 28
    patch_size: int = 14
    qkv_bias: bool = True
    qformer_hidden: int = 32
    qformer_layers: int = 2
    qformer_heads: int = 4
    qformer_ffn: int = 40
    cross_attention_frequency: int = 2
    num_query_tokens: int = 4
    qformer_vocab_extra: int = 0  # retrieval: more word pieces in the BERT vocabulary
    image_token: bool = True  # config.image_token_index set (the processor prepends <image> tokens)
    lm_hidden: int = 24
    lm_layers: int = 2
    lm_heads: int = 2
    lm_ffn: int = 36
    lm_vocab: int = 96
    embed_dim: int = 16  # image_text_hidden_size
    untied_head: bool = False  # T5: a separate lm_head (as Flan-T5 has); transformers 5 builds it tied
    tokenizer: bool = True  # opt/t5: write the LM tokenizer (tests/oracle_tokenizers.py) and a Blip2Processor
    seed: int = 0
    extra: dict = field(default_factory=dict)  # {"vision": {...}, "qformer": {...}, "text": {...}} overrides


def text_config(spec: Blip2Spec) -> dict:
    if spec.kind == "t5":
        config = dict(
            model_type="t5",
            vocab_size=spec.lm_vocab,
            d_model=spec.lm_hidden,
            d_kv=spec.lm_hidden // spec.lm_heads,
            d_ff=spec.lm_ffn,
            num_layers=spec.lm_layers,
            num_decoder_layers=spec.lm_layers,
            num_heads=spec.lm_heads,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    else:
        config = dict(
            model_type="opt",
            vocab_size=spec.lm_vocab,
            hidden_size=spec.lm_hidden,
            word_embed_proj_dim=spec.lm_hidden,
            ffn_dim=spec.lm_ffn,
            num_hidden_layers=spec.lm_layers,
            num_attention_heads=spec.lm_heads,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )
    config.update(spec.extra.get("text", {}))
    return config


def hf_config(spec: Blip2Spec, vocab_size: int | None = None, image_token_index: int | None = None):
    from transformers import Blip2Config

    vision = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        qkv_bias=spec.qkv_bias,
    )
    qformer = dict(
        hidden_size=spec.qformer_hidden,
        num_hidden_layers=spec.qformer_layers,
        num_attention_heads=spec.qformer_heads,
        intermediate_size=spec.qformer_ffn,
        cross_attention_frequency=spec.cross_attention_frequency,
        max_position_embeddings=40,
        use_qformer_text_input=spec.kind == "retrieval",
    )
    if vocab_size is not None:
        qformer["vocab_size"] = vocab_size
    vision.update(spec.extra.get("vision", {}))
    qformer.update(spec.extra.get("qformer", {}))
    kwargs = dict(
        vision_config=vision,
        qformer_config=qformer,
        num_query_tokens=spec.num_query_tokens,
        image_text_hidden_size=spec.embed_dim,
    )
    if spec.kind != "retrieval":
        kwargs["text_config"] = text_config(spec)
        if spec.image_token:
            kwargs["image_token_index"] = spec.lm_vocab - 1 if image_token_index is None else image_token_index
    elif spec.image_token:
        kwargs["image_token_index"] = vocab_size  # the <image> token the processor adds after the BERT vocabulary
    return Blip2Config(**kwargs)


def build_blip2_checkpoint(folder: Path, spec: Blip2Spec, *, max_shard_size: str | None = None) -> Path:
    """Create, randomise and save a transformers BLIP-2 model (plus image processor, and for retrieval its BERT
    tokenizer and Blip2Processor) into `folder`."""
    import transformers
    from transformers import BertTokenizerFast, Blip2Processor, BlipImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    image_processor = BlipImageProcessor(size={"height": spec.image_size, "width": spec.image_size})
    vocab_size = image_token_index = None
    if spec.kind == "retrieval":
        vocab = write_vocab(folder, spec.qformer_vocab_extra)
        vocab_size = len(vocab)
        tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
        queries = spec.num_query_tokens if spec.image_token else None  # the processor prepends <image> tokens
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=queries)
        processor.save_pretrained(folder)
    elif spec.tokenizer:  # the LM's tokenizer (with <image> when the config has image_token_index) + processor
        from transformers import AutoTokenizer

        from oracle_tokenizers import write_opt_tokenizer, write_t5_tokenizer

        write = write_t5_tokenizer if spec.kind == "t5" else write_opt_tokenizer
        info = write(folder, with_image_token=spec.image_token)
        spec = dataclasses.replace(spec, lm_vocab=max(spec.lm_vocab, info["vocab_size"]))
        image_token_index = info["image_token_id"]
        queries = spec.num_query_tokens if spec.image_token else None
        tokenizer = AutoTokenizer.from_pretrained(folder)
        Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=queries).save_pretrained(
            folder
        )
    else:
        image_processor.save_pretrained(folder)
    config = hf_config(spec, vocab_size, image_token_index)
    torch.manual_seed(spec.seed)
    model = getattr(transformers, HF_CLASSES[spec.kind])(config).eval()
    randomize(model, spec)
    if spec.untied_head:
        head = model.language_model.lm_head
        noise = torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(spec.seed + 2))
        head.weight = torch.nn.Parameter(noise / head.weight.shape[-1] ** 0.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


@torch.no_grad()
def randomize(model: torch.nn.Module, spec: Blip2Spec) -> None:
    """Every parameter random with real spread (LayerNorm weights near 1, all biases non-zero, incl. the key part
    of the ViT's qkv bias and the LayerNorm biases), so a wrong mapping cannot pass."""
    generator = torch.Generator().manual_seed(spec.seed + 1)
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        noise = torch.randn(param.shape, generator=generator)
        lower = name.lower()
        if "layernorm" in lower or "layer_norm" in lower or "final_layer_norm" in lower:
            param.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.05 * noise)
        elif "embed" in lower or "shared" in lower or "query_tokens" in lower or "relative_attention_bias" in lower:
            param.copy_(0.5 * noise)
        else:
            param.copy_(noise / max(param.shape[-1], 1) ** 0.5)


def hf_blip2_load(folder: Path, dtype: torch.dtype | None = None):
    """transformers' model for a saved folder (in `dtype`, float32 by default; Q-Former kept float32)."""
    import transformers

    data = json.loads((Path(folder) / "config.json").read_text())
    cls = getattr(transformers, data["architectures"][0])
    return cls.from_pretrained(folder, dtype=dtype or torch.float32).eval()


def hf_blip2_processor(folder: Path):
    from transformers import Blip2Processor

    return Blip2Processor.from_pretrained(folder)


def checkpoint_factory(tmp_path_factory):
    """`make(spec) -> folder`, each spec built once (per factory)."""
    made: dict[str, Path] = {}

    def make(spec: Blip2Spec | None = None, **kwargs) -> Path:
        spec = spec or Blip2Spec(**kwargs)
        key = repr(spec)
        if key not in made:
            made[key] = build_blip2_checkpoint(tmp_path_factory.mktemp(f"hf_blip2_{spec.kind}"), spec)
        return made[key]

    return make


def pixels(spec_or_size: Blip2Spec | int, n: int = 2, seed: int = 0) -> torch.Tensor:
    size = spec_or_size.image_size if isinstance(spec_or_size, Blip2Spec) else spec_or_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
