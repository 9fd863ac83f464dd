"""Search an embedded image collection: read a collection index (written by `blip batch embed`, built by
`blip.jobs.index`), find the ITC top-k for text or image queries, and re-rank text queries by the ITM match
probability. `blip retrieve`, the server's `/v1/retrieve` and the Python API all search through here.

Backends: faiss (``pip install faiss-cpu``) when the index was built with it, else numpy. Kinds: ``flat`` (exact
inner product), ``ivf`` (inverted lists over k-means cells) and ``hnsw`` (faiss only). Features are L2-normalised, so
inner product is cosine similarity (ITC).

On disk (``<out>/index/``)::

    index.json     format, family ("blip" or "blip2"), kind, backend, dim, count (images), vectors_per_image,
                   vectors, parameters, the model and job that made the vectors; a video collection adds
                   media ("video") and num_frames
    vectors.npy    float32 [count, dim] (BLIP) or [count, Q, dim] (BLIP-2): every image's features in collection order
    rows.jsonl     one line per image: {"image": id, "source": where the image is, "text"?: ...}
    faiss.index    faiss backends: the index itself
    ivf.npz        numpy ivf: centroids and the inverted lists

Video collections (``"media": "video"``, `blip.jobs.video`): a row is a video and its vector the normalised mean of
its sampled frames' features; re-ranking decodes each hit's frames again (the same `num_frames`) and scores the text
against their concatenated tokens (`blip.tasks.video.match_videos`). Everything else is as for images.

BLIP-2 (``blip2-itm-vit-g``, ``"family": "blip2"``, format ``blip-index/2``): an image has Q features, one per query
token, and its ITC score for a text is the largest cosine over them (`blip.tasks.blip2_itm.similarity`). The search
index holds all count * Q vectors, vector ``v`` belonging to image ``v // Q``; a text query takes the top k * Q
vectors and keeps each image's best, in order. Exact for a flat index: each image outside the true top k scores at
most the k-th image's score with all its Q vectors, and the top k images have at most k * Q vectors above it. An IVF or
HNSW index gives each image the best of its vectors the approximate search finds (as approximate as for BLIP). Image
queries are refused: BLIP-2 scores an image only against a text (its Q features against a text's one); it defines
no image-image similarity.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from blip.data.webdataset import TAR_PREFIX, read_member
from blip.io import read_jsonl
from blip.transforms import load_image

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)

INDEX = "index"  # the index folder inside a `blip batch embed` output folder
INDEX_FORMAT = "blip-index/1"  # BLIP: one vector per image
INDEX_FORMAT_BLIP2 = "blip-index/2"  # BLIP-2: Q vectors per image (vectors.npy is [count, Q, dim])
FAMILIES = {"blip": "BLIP", "blip2": "BLIP-2"}
_QUERY_BLOCK = 1024

ImageReader = Callable[[str, str], Image.Image]  # (row id, source) -> RGB image
Fetch = Callable[[str], bytes]  # an http(s) URL -> its bytes


class SearchIndexError(ValueError):
    """The index cannot be built, read or used as asked."""


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise SearchIndexError("the faiss backend needs faiss: pip install faiss-cpu") from e
    return faiss


@dataclass
class IndexInfo:
    kind: str
    backend: str
    dim: int
    count: int
    params: dict[str, Any] = field(default_factory=dict)


class VectorIndex(Protocol):
    info: IndexInfo

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k] float32, ids [q, k] int64), best first; id -1 (score -inf) where fewer than k exist."""
        ...


def top_k(scores: np.ndarray, ids: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row, best first; ties go to the smaller id. `ids` maps columns to ids."""
    q, n = scores.shape
    kk = min(k, n)
    out_scores = np.full((q, k), -np.inf, dtype=np.float32)
    out_ids = np.full((q, k), -1, dtype=np.int64)
    if kk == 0:
        return out_scores, out_ids
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (q, 1))
    for r in range(q):
        cols = part[r]
        row_ids = ids[cols] if ids is not None else cols
        order = np.lexsort((row_ids, -scores[r, cols]))
        out_scores[r, :kk] = scores[r, cols[order]]
        out_ids[r, :kk] = row_ids[order]
    return out_scores, out_ids


class NumpyFlatIndex:
    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self.info = IndexInfo("flat", "numpy", int(vectors.shape[1]), int(vectors.shape[0]))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        parts = [
            top_k(queries[s : s + _QUERY_BLOCK] @ self.vectors.T, None, k) for s in range(0, len(queries), _QUERY_BLOCK)
        ]
        if not parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class NumpyIVFIndex:
    """Inverted lists over k-means cells; a query scans the `nprobe` cells nearest to it, exactly."""

    def __init__(self, vectors: np.ndarray, centroids: np.ndarray, order: np.ndarray, offsets: np.ndarray, nprobe: int):
        self.vectors = vectors
        self.centroids = centroids
        self.order = order
        self.offsets = offsets
        self.nprobe = nprobe
        params = {"nlist": int(len(centroids)), "nprobe": int(nprobe)}
        self.info = IndexInfo("ivf", "numpy", int(vectors.shape[1]), int(vectors.shape[0]), params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores_out = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids_out = np.full((len(queries), k), -1, dtype=np.int64)
        nprobe = min(self.nprobe, len(self.centroids))
        cells = np.argpartition(-(queries @ self.centroids.T), nprobe - 1, axis=1)[:, :nprobe]
        for r, query in enumerate(queries):
            ids = np.concatenate([self.order[self.offsets[c] : self.offsets[c + 1]] for c in cells[r]])
            s, i = top_k((self.vectors[ids] @ query)[None, :], ids, k)
            scores_out[r], ids_out[r] = s[0], i[0]
        return scores_out, ids_out


class FaissIndex:
    def __init__(self, index: Any, info: IndexInfo):
        self.index = index
        self.info = info

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# The collection index of a batch output folder


def read_source_image(row_id: str, source: str, fetch: Fetch | None = None) -> Image.Image:
    """A collection row's image: a local path, a WebDataset member (tar://shard#offset:size) or, with `fetch`, an
    http(s) URL."""
    return load_image(_source_data(source, fetch, "image"), name=row_id)


def _source_data(source: str, fetch: Fetch | None, what: str) -> str | bytes:
    """What a collection row's source holds, for a decoder: a local path as is, else the bytes of a WebDataset
    member or (with `fetch`) of an http(s) URL."""
    if source.startswith(TAR_PREFIX):
        return read_member(source)
    if source.startswith(("http://", "https://")):
        if fetch is None:
            raise OSError(f"cannot fetch {source}: no URL fetcher given")
        return fetch(source)
    if not source:
        raise OSError(f"no {what}")
    return source


def best_per_owner(scores: np.ndarray, ids: np.ndarray, per_owner: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Vector hits (scores, ids [q, m], best first) -> each owner's best hit, the k best owners first (ties: the
    smaller owner); vector ``v`` belongs to owner ``v // per_owner``. -inf / -1 where fewer than k owners were hit."""
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    for r, (row_scores, row_ids) in enumerate(zip(scores, ids)):
        best: dict[int, float] = {}
        for score, vector in zip(row_scores.tolist(), row_ids.tolist()):
            if vector >= 0:
                owner = vector // per_owner
                if owner not in best or score > best[owner]:
                    best[owner] = score
        ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))[:k]
        for c, (owner, score) in enumerate(ranked):
            out_scores[r, c], out_ids[r, c] = score, owner
    return out_scores, out_ids


@dataclass
class CollectionIndex:
    folder: Path
    index: VectorIndex  # over every vector: count of them (BLIP) or count * Q (BLIP-2; vector v is image v // Q)
    vectors: np.ndarray  # [count, dim] (BLIP) or [count, Q, dim] (BLIP-2), as in vectors.npy
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    fetch: Fetch | None = None  # how http(s) rows are read for re-ranking (None: they are not)

    @property
    def family(self) -> str:
        """ "blip" or "blip2": the model family whose features the index holds."""
        return str(self.meta.get("family", "blip"))

    @property
    def per_image(self) -> int:
        """Vectors per image: 1 (BLIP) or Q (BLIP-2, one per query token)."""
        return int(self.meta.get("vectors_per_image", 1))

    def read_image(self, i: int) -> Image.Image:
        row = self.rows[i]
        return read_source_image(row["image"], row.get("source", ""), self.fetch)

    @property
    def media(self) -> str:
        """ "image", or "video" for a collection of videos (each row's vector: its frames' mean feature)."""
        return str(self.meta.get("media", "image"))

    def read_video(self, i: int, size: int | None = None) -> list[Image.Image]:
        """A video row's frames, sampled as when it was embedded (`num_frames` of index.json)."""
        from blip.video import read_frames

        row = self.rows[i]
        source, num_frames = row.get("source", ""), int(self.meta.get("num_frames", 8))
        return read_frames(_source_data(source, self.fetch, "video"), num_frames, size=size, name=row["image"])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k], rows [q, k]) of the k best images per query, best first: an image's score is its
        vector's inner product (BLIP), or the largest over its Q vectors (BLIP-2)."""
        if self.family != "blip2":
            return self.index.search(queries, k)
        scores, ids = self.index.search(queries, k * self.per_image)
        return best_per_owner(scores, ids, self.per_image, k)

    def check_image_queries(self) -> None:
        """`SearchIndexError` for a BLIP-2 index: BLIP-2 defines no image-image similarity."""
        if self.family == "blip2":
            raise SearchIndexError(
                "image queries are not supported for BLIP-2 indexes: BLIP-2 scores an image only against a text (its "
                "query features against the text's), with no image-image similarity; search with a text"
            )

    def check_model(self, blip: Blip) -> None:
        """`SearchIndexError` (one line) unless `blip` embeds into this index's space: its family and shapes."""
        from blip.tasks.options import embedding_shape, is_blip2

        family = "blip2" if is_blip2(blip) else "blip"
        by = self.meta.get("model_source") or "an unrecorded checkpoint"
        if family != self.family:
            raise SearchIndexError(
                f"{self.folder}: the index holds {FAMILIES.get(self.family, self.family)} features (embedded by {by}) "
                f"but the model ({blip.source or 'given'}) is {FAMILIES[family]}: search it with a "
                f"{FAMILIES.get(self.family, self.family)} retrieval model, the one that embedded it"
            )
        features = embedding_shape(blip)  # (E,) or BLIP-2 (Q, E)
        shape = (features[0] if len(features) == 2 else 1, features[-1])
        if shape != (self.per_image, int(self.meta.get("dim", 0))):
            raise SearchIndexError(
                f"{self.folder}: {self.per_image} x {self.meta.get('dim')} features per image, but the model "
                f"({blip.source or 'given'}) embeds {shape[0]} x {shape[1]}: search it with the model that embedded it"
            )


def load_collection_index(
    path: str | os.PathLike, *, nprobe: int | None = None, ef_search: int | None = None, fetch: Fetch | None = None
) -> CollectionIndex:
    """Open an index: the `blip batch embed` output folder or its ``index`` folder. `fetch` reads http(s) rows
    (re-ranking needs their pixels)."""
    folder = Path(path).expanduser()
    if (folder / INDEX / "index.json").exists():
        folder = folder / INDEX
    meta_path = folder / "index.json"
    if not meta_path.exists():
        raise SearchIndexError(f"{path}: no index here (expected {INDEX}/index.json from `blip batch embed`)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format", INDEX_FORMAT) not in (INDEX_FORMAT, INDEX_FORMAT_BLIP2):
        raise SearchIndexError(f"{path}: index format {meta.get('format')!r} is not one this version reads")
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    rows = read_jsonl(folder / "rows.jsonl")
    flat = np.asarray(vectors).reshape(-1, vectors.shape[-1]) if vectors.ndim == 3 else np.asarray(vectors)
    count = meta.get("vectors", meta["count"])
    info = IndexInfo(meta["kind"], meta["backend"], meta["dim"], count, meta.get("params", {}))
    index: VectorIndex
    if meta["backend"] == "faiss":
        faiss = import_faiss()
        raw = faiss.read_index(str(folder / "faiss.index"))
        if nprobe is not None and hasattr(raw, "nprobe"):
            raw.nprobe = nprobe
        if ef_search is not None and hasattr(raw, "hnsw"):
            raw.hnsw.efSearch = ef_search
        index = FaissIndex(raw, info)
    elif meta["kind"] == "ivf":
        ivf = np.load(folder / "ivf.npz")
        index = NumpyIVFIndex(
            flat,
            ivf["centroids"],
            ivf["order"],
            ivf["offsets"],
            nprobe or info.params.get("nprobe", 1),
        )
    else:
        index = NumpyFlatIndex(flat)
    return CollectionIndex(folder, index, vectors, rows, meta, fetch)


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval: ITC top-k, re-ranked by ITM


@dataclass
class Hit:
    rank: int
    image: str
    source: str
    itc: float
    itm: float | None = None
    row: int = -1  # the collection row


@dataclass(frozen=True)
class RetrieveOptions:
    """Queries with equal options search the same index in one call."""

    index: str  # the index's name (queries of one batch search one index)
    query: str  # "text" | "image"
    top_k: int
    rerank: bool


@dataclass
class RetrieveWork:
    """One query: a text, or an image (a `blip.tasks.batch.ImageItem`); `rows`: what the query costs the model,
    1 + its top_k ITM passes when re-ranked."""

    collection: CollectionIndex
    text: str | None = None
    image: Any = None
    rows: int = 1


def search_texts(
    blip: Blip, collection: CollectionIndex, texts: Sequence[str], *, top_k: int = 10, rerank: bool = True
) -> list[list[Hit]]:
    """For each text: the `top_k` images by ITC (cosine; BLIP-2: the largest over the image's query features),
    re-ranked by the ITM match probability when `rerank`."""
    collection.check_model(blip)
    family = blip._itm  # `blip.tasks.itm` or `blip.tasks.blip2_itm`
    queries = family.text_embeddings(blip, list(texts)).numpy()
    scores, ids = collection.search(queries, top_k)
    per_text = [[_hit(collection, int(i), float(s)) for s, i in zip(rs, ri) if i >= 0] for rs, ri in zip(scores, ids)]
    # A row that several texts re-rank is read (decoded, maybe fetched) once, and kept only until its last use.
    uses = Counter(hit.row for hits in per_text for hit in hits) if rerank else Counter()
    read: dict[int, Image.Image | Exception] = {}
    results = []
    for text, hits in zip(texts, per_text):
        if rerank and hits:
            blip.require("itm")
            images, keep = [], []
            for hit in hits:
                image = read[hit.row] if hit.row in read else _read_row(collection, hit.row, blip)
                uses[hit.row] -= 1
                if uses[hit.row]:
                    read[hit.row] = image
                else:
                    read.pop(hit.row, None)
                if isinstance(image, Exception):
                    _logger.warning("cannot re-rank %s: %s", hit.image, image)
                    continue
                images.append(image)
                keep.append(hit)
            probs = _match(blip, collection, images, text) if keep else []
            for hit, p in zip(keep, probs):
                hit.itm = p
            hits = sorted(keep, key=lambda h: (-(h.itm or 0.0), -h.itc))
        for rank, hit in enumerate(hits, start=1):
            hit.rank = rank
        results.append(hits)
    return results


def _read_row(collection: CollectionIndex, row: int, blip: Blip) -> Any:
    """The row's image (or, in a video collection, its sampled frames), or the exception that stopped reading it."""
    try:
        if collection.media == "video":
            return collection.read_video(row, blip.transform.image_size)
        return collection.read_image(row)
    except Exception as e:  # noqa: BLE001 - an unreadable image drops out of the ranking
        return e


def _match(blip: Blip, collection: CollectionIndex, items: list[Any], text: str) -> list[float]:
    """ITM P(match) of `text` with each hit: an image, or a video's frames concatenated (`blip.tasks.video`)."""
    if collection.media == "video":
        from blip.tasks.video import match_videos

        return match_videos(blip, items, [text] * len(items), list(range(len(items))))
    return blip._itm.match_probabilities(blip, items, [text] * len(items), list(range(len(items))))


def search_images(
    blip: Blip, collection: CollectionIndex, images: Sequence[Any], *, top_k: int = 10
) -> list[list[Hit]]:
    """For each query image: the `top_k` most similar images of the collection by ITC image-image cosine (BLIP
    indexes; BLIP-2 defines no image-image similarity, so its indexes refuse image queries)."""
    from blip.tasks.common import unique_images
    from blip.tasks.itm import image_embeddings

    collection.check_model(blip)
    collection.check_image_queries()
    decoded, index = unique_images(list(images))
    queries = image_embeddings(blip, decoded).numpy()[index]
    scores, ids = collection.search(queries, top_k)
    out = []
    for row_scores, row_ids in zip(scores, ids):
        hits = [_hit(collection, int(i), float(s)) for s, i in zip(row_scores, row_ids) if i >= 0]
        for rank, hit in enumerate(hits, start=1):
            hit.rank = rank
        out.append(hits)
    return out


def _hit(collection: CollectionIndex, i: int, score: float) -> Hit:
    row = collection.rows[i]
    return Hit(rank=0, image=row["image"], source=row.get("source", ""), itc=score, row=i)
