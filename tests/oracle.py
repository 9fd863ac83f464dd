"""transformers as a test oracle: build random-weight BLIP checkpoints of any shape and save them as a hub folder.

Only tests import this module; transformers is a dev dependency, never a runtime one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = (
    "a an the of on in with and is are to at by for from near two three red blue green yellow black white orange "
    "purple circle square triangle star shape shapes left right top bottom center small large big picture photo "
    "dog dogs cat woman man beach sitting standing sand water tree sky how many what where color colour there it "
    "yes no one zero ? . , ' s t play ##s ##ing ##ed ##er ##ly un ##able"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
HF_CLASSES = {
    "caption": "BlipForConditionalGeneration",
    "vqa": "BlipForQuestionAnswering",
    "retrieval": "BlipForImageTextRetrieval",
}


@dataclass
class TinySpec:
    kind: str = "caption"
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_mlp: int = 48
    image_size: int = 32
    patch_size: int = 8
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 40
    extra_vocab: int = 0  # more word pieces, to vary the vocabulary size
    vocab: tuple[str, ...] = ()  # the whole vocabulary (specials first) instead of WORDS, e.g. the shapes one
    eos_bias: float = 4.0  # pushes [SEP] up so generations end at different lengths
    seed: int = 0
    extra: dict = field(default_factory=dict)


# BLIP-base: ViT-B/16 at 384, 12-layer BERT with 12 heads; a full 30524-token vocabulary (so the LM head is real).
BASE_SIZES = dict(
    vision_hidden=768,
    vision_layers=12,
    vision_heads=12,
    vision_mlp=3072,
    image_size=384,
    patch_size=16,
    text_hidden=768,
    text_layers=12,
    text_heads=12,
    text_ffn=3072,
    eos_bias=0.0,
)


def base_spec(kind: str, full_vocab: bool = True, **changes) -> TinySpec:
    extra = 30522 - len(SPECIAL) - len(dict.fromkeys(WORDS)) if full_vocab else 0
    return TinySpec(kind=kind, extra_vocab=extra, **{**BASE_SIZES, **changes})


def write_vocab(folder: Path, extra: int = 0, words: tuple[str, ...] = ()) -> list[str]:
    vocab = list(words) or SPECIAL + [w for w in dict.fromkeys(WORDS)]
    vocab += [f"w{i}" for i in range(extra)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return vocab


def build_hf_checkpoint(folder: Path, spec: TinySpec) -> Path:
    """Create, randomise and save a transformers BLIP model plus processor into `folder`."""
    import transformers
    from transformers import BertTokenizerFast, BlipConfig, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(folder, spec.extra_vocab, spec.vocab)
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)  # transformers 5: `vocab=`
    image_processor = BlipImageProcessor(size={"height": spec.image_size, "width": spec.image_size})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    text_config = dict(
        vocab_size=len(vocab) + 2,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_ffn,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=64,
        bos_token_id=len(vocab),
        sep_token_id=vocab.index("[SEP]"),
        pad_token_id=0,
        encoder_hidden_size=spec.vision_hidden,
    )
    vision_config = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    text_config.update(spec.extra.get("text", {}))
    vision_config.update(spec.extra.get("vision", {}))
    config = BlipConfig(
        text_config=text_config, vision_config=vision_config, image_text_hidden_size=spec.extra.get("embed_dim", 24)
    )
    torch.manual_seed(spec.seed)
    model = getattr(transformers, HF_CLASSES[spec.kind])(config).eval()
    randomize(model, spec)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@torch.no_grad()
def randomize(model: torch.nn.Module, spec: TinySpec) -> None:
    """transformers initialises the ViT with std 1e-10; give every weight real spread so outputs differ."""
    generator = torch.Generator().manual_seed(spec.seed + 1)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "LayerNorm" in name or "layer_norm" in name or "layernorm" in name:
            param.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.05 * noise)
        elif "embedding" in name:
            param.copy_(0.5 * noise)
        else:
            param.copy_(noise / max(param.shape[-1], 1) ** 0.5)
    if spec.kind in ("caption", "vqa"):
        bias = model.text_decoder.cls.predictions.bias
        bias[model.config.text_config.sep_token_id] += spec.eos_bias


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    images = []
    for i in range(n):
        w, h = int(rng.randint(20, 90)), int(rng.randint(20, 90))
        base = rng.randint(0, 255, size=(1, 1, 3))
        noise = rng.randint(-60, 60, size=(h, w, 3))
        pixels = np.clip(base + noise + (i * 37) % 100, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    """`image` encoded as a file's bytes (PNG unless `fmt` says otherwise)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def hf_load(folder: Path, kind: str):
    import transformers

    model = getattr(transformers, HF_CLASSES[kind]).from_pretrained(folder).eval()
    processor = transformers.BlipProcessor.from_pretrained(folder)
    return model, processor
