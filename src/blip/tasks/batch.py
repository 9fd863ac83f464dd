"""Several requests (server micro-batches) or rows (batch jobs) in one call of the task functions: images shared by
content are encoded once, the task runs once over everything, and the results are split back per request or row.

`dispatch(blip, task, options, works)` is the one entry point; the server's micro-batcher and the jobs' row runner
both call it. A work is one request's (or one row's) share of the call: its images (with a key saying which are the
same image), and its texts."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from blip.tasks import blip2 as blip2_generate
from blip.tasks.caption import caption_images
from blip.tasks.options import CaptionOptions, VqaOptions, is_blip2
from blip.tasks.vqa import answer_candidates, answer_questions
from blip.transforms import PreparedImage

if TYPE_CHECKING:
    from blip.api import Blip
    from blip.tasks.retrieval import RetrieveOptions, RetrieveWork

TASKS = ("caption", "vqa", "vqa_top", "match", "similarity", "embed", "retrieve", "explain", "reason")


@dataclass(frozen=True)
class ImageItem:
    key: Hashable  # equal keys are one image (the server: sha256 of the encoded bytes; jobs: where it was read from)
    image: Image.Image | PreparedImage  # prepared: decoded ahead at the model's size (`blip.transforms`)


@dataclass
class CaptionWork:
    images: list[ImageItem]
    seeds: list[int] | None = None  # sampling: one seed per image, each image then samples from its own generator


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
class EmbedWork:
    images: list[ImageItem] = field(default_factory=list)


@dataclass
class ExplainWork:
    """ITM Grad-CAM of one (image, text) pair; the layer is the batch's options (None: the model's default)."""

    image: ImageItem
    text: str


@dataclass
class ReasonWork:
    """NLVR2: statement s is about the pair (images[image_a[s]], images[image_b[s]])."""

    images: list[ImageItem]
    statements: list[str]
    image_a: list[int]
    image_b: list[int]


def rows(work: Any) -> int:
    """Batch rows a work adds: images to caption or embed, questions or pairs, embeddings, or a query's cost."""
    if isinstance(work, CaptionWork | EmbedWork):
        return len(work.images)
    if isinstance(work, PairWork):
        return len(work.texts)
    if isinstance(work, ReasonWork):
        return len(work.statements)
    if isinstance(work, SimilarityWork):
        return max(len(work.images), len(work.texts))
    return int(getattr(work, "rows", 1))


def row_seed(seed: int, row_id: str, namespace: str = "blip.batch") -> int:
    """The sampling seed of one row: a hash of (namespace, seed, row id), stable across runs, processes, machines and
    batch sizes."""
    digest = hashlib.sha256(f"{namespace}/{seed}/{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def merge_images(groups: Sequence[Sequence[ImageItem]]) -> tuple[list[Image.Image], list[list[int]]]:
    """Distinct images over all groups, and for each group the index of each of its images into them."""
    slots: dict[Hashable, int] = {}
    images: list[Image.Image] = []
    index: list[list[int]] = []
    for group in groups:
        positions = []
        for item in group:
            if item.key not in slots:
                slots[item.key] = len(images)
                images.append(item.image)
            positions.append(slots[item.key])
        index.append(positions)
    return images, index


def dispatch(blip: Blip, task: str, options: Any, works: Sequence[Any]) -> list[Any]:
    """One result per work, in order:

    - caption (`CaptionOptions`, `CaptionWork`): per image, its list of `num_captions` captions
    - vqa (`VqaOptions`, `PairWork`): an `Answer` per question
    - vqa_top (`TopAnswers`, `PairWork`): per question its `count` best generated `Answer`s, best first
    - match (`PairWork`): P(match) per text
    - similarity (`SimilarityWork`): ITC cosine [image][text]
    - embed (`EmbedWork`): float32 ITC image features [n_images, dim] (numpy)
    - retrieve (`blip.tasks.retrieval.RetrieveOptions`, `RetrieveWork`): the hits of each query
    - explain (layer or None, `ExplainWork`): an `Explanation` per pair (one backward pass each)
    - reason (`ReasonWork`): a `Verdict` per statement (NLVR2)"""
    if not works:
        return []
    if task == "caption":
        return _caption(blip, options if options is not None else CaptionOptions(), works)
    if task == "vqa":
        return _vqa(blip, options if options is not None else VqaOptions(), works)
    if task == "vqa_top":
        return _vqa_top(blip, options, works)
    if task == "match":
        images, texts, image_index = _pairs(works)
        probs = blip._itm.match_probabilities(blip, images, texts, image_index)
        return _split(probs, [len(w.texts) for w in works])
    if task == "similarity":
        return _similarity(blip, works)
    if task == "embed":
        images, index = merge_images([w.images for w in works])
        feats = blip._itm.image_embeddings(blip, images).numpy().astype(np.float32, copy=False)
        return [feats[positions] for positions in index]
    if task == "retrieve":
        return _retrieve(blip, options, works)
    if task == "explain":
        return [blip.explain(w.image.image, w.text, layer=options) for w in works]
    if task == "reason":
        return _reason(blip, works)
    raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


def _caption(blip: Blip, options: CaptionOptions, works: Sequence[CaptionWork]) -> list[list[list[Any]]]:
    captions = blip2_generate.caption_images if is_blip2(blip) else caption_images
    generation = options.generation()
    seeded = [w.seeds is not None for w in works]
    if not any(seeded):
        images, index = merge_images([w.images for w in works])
        per_image = captions(blip, images, prompt=options.prompt, generation=generation)
        return [[per_image[i] for i in positions] for positions in index]
    if not all(seeded):
        raise ValueError("a batch of seeded caption works has works without seeds")
    # Each image samples from its own generator: no sharing, so what an image gets depends on its seed alone.
    images, generators = [], []
    for work in works:
        assert work.seeds is not None
        if len(work.seeds) != len(work.images):
            raise ValueError(f"{len(work.seeds)} seeds for {len(work.images)} images")
        images += [item.image for item in work.images]
        generators += [torch.Generator(device=blip.device).manual_seed(seed) for seed in work.seeds]
    per_image = captions(blip, images, prompt=options.prompt, generation=generation, generators=generators)
    return _split(per_image, [len(w.images) for w in works])


def _pairs(works: Sequence[PairWork]) -> tuple[list[Image.Image], list[str], list[int]]:
    images, index = merge_images([w.images for w in works])
    texts = [t for w in works for t in w.texts]
    image_index = [positions[i] for w, positions in zip(works, index) for i in w.image_of]
    return images, texts, image_index


def _reason(blip: Blip, works: Sequence[ReasonWork]) -> list[list[Any]]:
    from blip.tasks.reason import reason_pairs

    blip.require("reason")
    images, index = merge_images([w.images for w in works])
    statements = [s for w in works for s in w.statements]
    index_a = [positions[i] for w, positions in zip(works, index) for i in w.image_a]
    index_b = [positions[i] for w, positions in zip(works, index) for i in w.image_b]
    return _split(reason_pairs(blip, images, statements, index_a, index_b), [len(w.statements) for w in works])


def _split(values: list[Any], sizes: Sequence[int]) -> list[list[Any]]:
    """`values` cut into consecutive runs of `sizes`."""
    out, start = [], 0
    for size in sizes:
        out.append(values[start : start + size])
        start += size
    return out


def _vqa(blip: Blip, options: VqaOptions, works: Sequence[PairWork]) -> list[list[Any]]:
    images, questions, image_index = _pairs(works)
    generation = options.generation()
    if is_blip2(blip):
        results = blip2_generate.answer_questions(
            blip, images, questions, image_index, generation=generation, prompt_template=options.prompt_template
        )
    else:
        results = answer_questions(blip, images, questions, image_index, generation=generation, answers=options.answers)
    return _split(results, [len(w.texts) for w in works])


@dataclass(frozen=True)
class TopAnswers:
    """The options of task vqa_top: `count` answers per question, the best beams of beam search of width
    `vqa.num_beams` (at least `count`; 1 is greedy)."""

    vqa: VqaOptions
    count: int

    def __post_init__(self) -> None:
        if self.vqa.answers is not None:
            raise ValueError("vqa_top generates answers: ranking given ones is the vqa task's")
        if not 1 <= self.count <= self.vqa.num_beams:
            raise ValueError(f"count must be between 1 and num_beams ({self.vqa.num_beams}), got {self.count}")


def _vqa_top(blip: Blip, options: TopAnswers, works: Sequence[PairWork]) -> list[list[Any]]:
    images, questions, image_index = _pairs(works)
    generation = dataclasses.replace(options.vqa.generation(), num_return_sequences=options.count)
    if is_blip2(blip):
        template = options.vqa.prompt_template
        results = blip2_generate.answer_candidates(
            blip, images, questions, image_index, generation=generation, prompt_template=template
        )
    else:
        results = answer_candidates(blip, images, questions, image_index, generation=generation)
    return _split(results, [len(w.texts) for w in works])


def _similarity(blip: Blip, works: Sequence[SimilarityWork]) -> list[list[list[float]]]:
    images, index = merge_images([w.images for w in works])
    slots = {text: i for i, text in enumerate(dict.fromkeys(t for w in works for t in w.texts))}
    family = blip._itm
    image_feats = family.image_embeddings(blip, images)
    text_feats = family.text_embeddings(blip, list(slots))
    out = []
    for work, positions in zip(works, index):
        rows_i = image_feats[positions]
        rows_t = text_feats[[slots[t] for t in work.texts]]
        out.append(family.similarity(rows_i, rows_t).tolist())
    return out


def _retrieve(blip: Blip, options: RetrieveOptions, works: Sequence[RetrieveWork]) -> list[list[Any]]:
    """ITC top-k from the index, text queries re-ranked by ITM: the same search as `blip retrieve`."""
    from blip.tasks.retrieval import search_images, search_texts

    collection = works[0].collection
    if any(w.collection is not collection for w in works):
        raise ValueError("one retrieval batch searches one collection")
    if options.query == "text":
        texts = [w.text or "" for w in works]
        return search_texts(blip, collection, texts, top_k=options.top_k, rerank=options.rerank)
    images, index = merge_images([[w.image] for w in works if w.image is not None])
    if len(index) != len(works):
        raise ValueError("an image query without an image")
    per_image = search_images(blip, collection, images, top_k=options.top_k)
    return [per_image[positions[0]] for positions in index]
