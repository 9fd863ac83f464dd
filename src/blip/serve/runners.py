"""What the inference thread runs: several requests' inputs merged into one call of the task functions in
`blip.tasks` (the same functions the Python API and the CLI use), then split back per request.

Images are shared within a batch by content: the same image sent by two requests (or twice in one) is decoded by
each request but encoded by the model once."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from blip.jobs.index import CollectionIndex, Hit, search_images, search_texts
from blip.models.generation import GenerationConfig
from blip.tasks.caption import caption_images
from blip.tasks.common import Answer, Caption
from blip.tasks.itm import image_embeddings, match_probabilities, text_embeddings
from blip.tasks.vqa import answer_questions

if TYPE_CHECKING:
    from blip.api import Blip


@dataclass(frozen=True)
class ImageItem:
    digest: str  # sha256 of the encoded bytes: equal digests are one image
    image: Image.Image


@dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys may share a model call."""

    task: str  # "caption" | "vqa" | "match" | "similarity" | "retrieve"
    model: str
    options: Hashable = None
    solo: int | None = None  # set (unique per request) for work that must run alone, e.g. sampling with a seed


@dataclass(frozen=True)
class CaptionOptions:
    prompt: str | None
    generation: GenerationConfig


@dataclass(frozen=True)
class VqaOptions:
    generation: GenerationConfig
    answers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RetrieveOptions:
    """Queries with equal options search the same index in one call."""

    index: str
    query: str  # "text" | "image"
    top_k: int
    rerank: bool


@dataclass
class CaptionWork:
    images: list[ImageItem]


@dataclass
class PairWork:
    """VQA (texts are questions) and ITM: text t is about images[image_of[t]]."""

    images: list[ImageItem]
    texts: list[str]
    image_of: list[int]


@dataclass
class SimilarityWork:
    images: list[ImageItem]
    texts: list[str]


@dataclass
class RetrieveWork:
    """One query: a text, or an image; `collection` is the index of the key's `RetrieveOptions.index`. `rows`: what
    the query costs the model, 1 + its top_k ITM passes when re-ranked."""

    collection: CollectionIndex
    text: str | None = None
    image: ImageItem | None = None
    rows: int = 1


def rows(work: CaptionWork | PairWork | SimilarityWork | RetrieveWork) -> int:
    """Batch rows a request adds: images to caption, questions or pairs, embeddings to compute, or queries."""
    if isinstance(work, RetrieveWork):
        return work.rows
    if isinstance(work, CaptionWork):
        return len(work.images)
    if isinstance(work, PairWork):
        return len(work.texts)
    return max(len(work.images), len(work.texts))


def merge_images(groups: list[list[ImageItem]]) -> tuple[list[Image.Image], list[list[int]]]:
    """Distinct images over all groups, and for each group the index of each of its images into them."""
    slots: dict[str, int] = {}
    images: list[Image.Image] = []
    index: list[list[int]] = []
    for group in groups:
        positions = []
        for item in group:
            if item.digest not in slots:
                slots[item.digest] = len(images)
                images.append(item.image)
            positions.append(slots[item.digest])
        index.append(positions)
    return images, index


def _distinct(texts: list[str]) -> tuple[list[str], dict[str, int]]:
    slots = {text: i for i, text in enumerate(dict.fromkeys(texts))}
    return list(slots), slots


class TaskRunner:
    """runner(key, payloads) for MicroBatcher: one merged task call per batch."""

    def __init__(self, models: dict[str, Blip]):
        self.models = models

    def __call__(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        if not isinstance(key, BatchKey):
            raise TypeError(f"unexpected batch key {key!r}")
        blip = self.models[key.model]
        if key.task == "caption":
            return self.caption(blip, key.options, payloads)
        if key.task == "vqa":
            return self.vqa(blip, key.options, payloads)
        if key.task == "match":
            return self.match(blip, payloads)
        if key.task == "similarity":
            return self.similarity(blip, payloads)
        if key.task == "retrieve":
            return self.retrieve(blip, key.options, payloads)
        raise ValueError(f"unknown task {key.task!r}")

    @staticmethod
    def caption(blip: Blip, options: CaptionOptions, works: list[CaptionWork]) -> list[list[list[Caption]]]:
        images, index = merge_images([w.images for w in works])
        per_image = caption_images(blip, images, prompt=options.prompt, generation=options.generation)
        return [[per_image[i] for i in positions] for positions in index]

    @staticmethod
    def _pairs(works: list[PairWork]) -> tuple[list[Image.Image], list[str], list[int]]:
        images, index = merge_images([w.images for w in works])
        texts = [t for w in works for t in w.texts]
        image_index = [positions[i] for w, positions in zip(works, index) for i in w.image_of]
        return images, texts, image_index

    @staticmethod
    def _split(values: list[Any], works: list[PairWork]) -> list[list[Any]]:
        out, start = [], 0
        for work in works:
            out.append(values[start : start + len(work.texts)])
            start += len(work.texts)
        return out

    def vqa(self, blip: Blip, options: VqaOptions, works: list[PairWork]) -> list[list[Answer]]:
        images, questions, image_index = self._pairs(works)
        answers = list(options.answers) if options.answers is not None else None
        results = answer_questions(blip, images, questions, image_index, generation=options.generation, answers=answers)
        return self._split(results, works)

    def match(self, blip: Blip, works: list[PairWork]) -> list[list[float]]:
        images, texts, image_index = self._pairs(works)
        return self._split(match_probabilities(blip, images, texts, image_index), works)

    @staticmethod
    def similarity(blip: Blip, works: list[SimilarityWork]) -> list[list[list[float]]]:
        images, index = merge_images([w.images for w in works])
        texts, slots = _distinct([t for w in works for t in w.texts])
        image_feats = image_embeddings(blip, images)
        text_feats = text_embeddings(blip, texts)
        out = []
        for work, positions in zip(works, index):
            rows_i = image_feats[positions]
            rows_t = text_feats[[slots[t] for t in work.texts]]
            out.append((rows_i @ rows_t.T).tolist())
        return out

    @staticmethod
    def retrieve(blip: Blip, options: RetrieveOptions, works: list[RetrieveWork]) -> list[list[Hit]]:
        """The same search as `blip retrieve`: ITC top-k from the index, text queries re-ranked by ITM."""
        collection = works[0].collection
        if options.query == "text":
            texts = [w.text or "" for w in works]
            return search_texts(blip, collection, texts, top_k=options.top_k, rerank=options.rerank)
        images, index = merge_images([[w.image] for w in works if w.image is not None])
        per_image = search_images(blip, collection, images, top_k=options.top_k)
        return [per_image[positions[0]] for positions in index]
