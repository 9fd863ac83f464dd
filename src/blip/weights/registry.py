"""Published BLIP checkpoints: short names -> hub ids, with what each one is for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PretrainedInfo:
    hub_id: str
    kind: str  # BLIP: caption | vqa | retrieval; BLIP-2: opt | t5 | retrieval
    vision: str  # ViT-B, ViT-L or ViT-g (BLIP-2's EVA ViT-g/14)
    description: str
    prompt_template: str | None = None  # BLIP-2 VQA: how answer() formats a question
    family: str = "blip"  # blip | blip-2


def _info(hub_id: str, kind: str, vision: str, description: str) -> PretrainedInfo:
    return PretrainedInfo(hub_id, kind, vision, description)


BLIP2_PROMPT_TEMPLATE = "Question: {} Answer:"  # transformers' BLIP-2 docs; LAVIS's zero-shot VQA says "Short answer:"


def _blip2(hub_id: str, kind: str, description: str) -> PretrainedInfo:
    template = BLIP2_PROMPT_TEMPLATE if kind != "retrieval" else None
    return PretrainedInfo(hub_id, kind, "ViT-g", description, template, "blip-2")


PRETRAINED: dict[str, PretrainedInfo] = {
    "caption-base": _info("Salesforce/blip-image-captioning-base", "caption", "ViT-B", "COCO captioning"),
    "caption-large": _info("Salesforce/blip-image-captioning-large", "caption", "ViT-L", "COCO captioning"),
    "vqa-base": _info("Salesforce/blip-vqa-base", "vqa", "ViT-B", "VQAv2"),
    # "capfilt-large" names the CapFilt-L bootstrapped data; the model itself is ViT-B (docs/checkpoints.md).
    "vqa-capfilt-large": _info("Salesforce/blip-vqa-capfilt-large", "vqa", "ViT-B", "VQAv2, CapFilt-L data"),
    "itm-base-coco": _info("Salesforce/blip-itm-base-coco", "retrieval", "ViT-B", "COCO retrieval / ITM"),
    "itm-large-coco": _info("Salesforce/blip-itm-large-coco", "retrieval", "ViT-L", "COCO retrieval / ITM"),
    "itm-base-flickr": _info("Salesforce/blip-itm-base-flickr", "retrieval", "ViT-B", "Flickr30k retrieval / ITM"),
    "itm-large-flickr": _info("Salesforce/blip-itm-large-flickr", "retrieval", "ViT-L", "Flickr30k retrieval / ITM"),
    # BLIP-2 (EVA ViT-g/14 at 224 px, 32 queries; the -coco fine-tunes at 364 px): Blip2ForConditionalGeneration
    # with OPT or Flan-T5, and Blip2ForImageTextRetrieval.
    "blip2-opt-2.7b": _blip2("Salesforce/blip2-opt-2.7b", "opt", "OPT-2.7b, pretrained: captions, zero-shot VQA"),
    "blip2-opt-6.7b": _blip2("Salesforce/blip2-opt-6.7b", "opt", "OPT-6.7b, pretrained: captions, zero-shot VQA"),
    "blip2-opt-2.7b-coco": _blip2("Salesforce/blip2-opt-2.7b-coco", "opt", "OPT-2.7b, COCO captioning"),
    "blip2-opt-6.7b-coco": _blip2("Salesforce/blip2-opt-6.7b-coco", "opt", "OPT-6.7b, COCO captioning"),
    "blip2-flan-t5-xl": _blip2("Salesforce/blip2-flan-t5-xl", "t5", "Flan-T5-XL, pretrained: captions, VQA"),
    "blip2-flan-t5-xl-coco": _blip2("Salesforce/blip2-flan-t5-xl-coco", "t5", "Flan-T5-XL, COCO captioning"),
    "blip2-flan-t5-xxl": _blip2("Salesforce/blip2-flan-t5-xxl", "t5", "Flan-T5-XXL, pretrained: captions, VQA"),
    "blip2-itm-vit-g": _blip2("Salesforce/blip2-itm-vit-g", "retrieval", "Q-Former ITM / ITC (pretrained)"),
    "blip2-itm-vit-g-coco": _blip2("Salesforce/blip2-itm-vit-g-coco", "retrieval", "Q-Former ITM / ITC, COCO"),
}
# Files a BLIP folder may hold; only these are fetched from the hub.
HUB_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",  # OPT's GPT-2 BPE (BLIP-2)
    "merges.txt",
    "spiece.model",  # T5's SentencePiece (BLIP-2 Flan-T5)
    "added_tokens.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
]
# Where the tokenizer of an original `.pth` (which ships none) comes from: every BLIP-1 hub repo carries the same
# bert-base-uncased files.
DEFAULT_TOKENIZER_SOURCE = "Salesforce/blip-image-captioning-base"
# Which published checkpoint each kind of task needs, for error messages.
EXAMPLE_FOR_TASK = {
    "caption": "a captioning checkpoint (BlipForConditionalGeneration, e.g. Salesforce/blip-image-captioning-base)",
    "vqa": "a VQA checkpoint (BlipForQuestionAnswering, e.g. Salesforce/blip-vqa-base)",
    "itm": "a retrieval/ITM checkpoint (BlipForImageTextRetrieval, e.g. Salesforce/blip-itm-base-coco)",
    "itc": "a retrieval/ITM checkpoint (BlipForImageTextRetrieval, e.g. Salesforce/blip-itm-base-coco)",
    "reason": "an NLVR2 checkpoint (model_base_nlvr.pth, or a model fine-tuned with `blip train` task=nlvr)",
}


# The same for BLIP-2 checkpoints (Blip2.require).
_BLIP2_GENERATION = (
    "a BLIP-2 generation checkpoint (Blip2ForConditionalGeneration, e.g. blip2-opt-2.7b, blip2-flan-t5-xl)"
)
EXAMPLE_FOR_TASK_BLIP2 = {
    "caption": _BLIP2_GENERATION,
    "vqa": _BLIP2_GENERATION,
    "itm": "a BLIP-2 retrieval checkpoint (Blip2ForImageTextRetrieval, e.g. blip2-itm-vit-g)",
    "itc": "a BLIP-2 retrieval checkpoint (Blip2ForImageTextRetrieval, e.g. blip2-itm-vit-g)",
    "reason": "a BLIP NLVR2 checkpoint (BLIP-2 has no visual-reasoning head)",
}


def pretrained_info(source: str) -> PretrainedInfo | None:
    """The registry entry for a short name or hub id, if it is one."""
    if source in PRETRAINED:
        return PRETRAINED[source]
    return next((info for info in PRETRAINED.values() if info.hub_id == source), None)


def list_pretrained() -> dict[str, str]:
    """Short name -> hub id of every published BLIP and BLIP-2 checkpoint `blip.load` knows by name."""
    return {name: info.hub_id for name, info in PRETRAINED.items()}


def resolve_name(name: str) -> str:
    """A short name (`caption-base`) becomes its hub id; anything else is returned unchanged."""
    return PRETRAINED[name].hub_id if name in PRETRAINED else name
