"""Published BLIP checkpoints: short names -> hub ids, with what each one is for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PretrainedInfo:
    hub_id: str
    kind: str  # caption | vqa | retrieval
    vision: str  # ViT-B or ViT-L
    description: str


def _info(hub_id: str, kind: str, vision: str, description: str) -> PretrainedInfo:
    return PretrainedInfo(hub_id, kind, vision, description)


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
}


def list_pretrained() -> dict[str, str]:
    """Short name -> hub id of every published BLIP checkpoint `blip.load` knows by name."""
    return {name: info.hub_id for name, info in PRETRAINED.items()}


def resolve_name(name: str) -> str:
    """A short name (`caption-base`) becomes its hub id; anything else is returned unchanged."""
    return PRETRAINED[name].hub_id if name in PRETRAINED else name
