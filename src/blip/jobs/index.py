"""Search an embedded collection: a vector index over `blip batch embed` output, and ITC search + ITM re-ranking.

Backends: faiss (``pip install faiss-cpu``) when it is installed, else numpy. Kinds: ``flat`` (exact inner product;
the default up to `AUTO_FLAT_MAX` vectors), ``ivf`` (inverted lists over k-means cells) and ``hnsw`` (faiss only; the
numpy backend uses ivf instead). Features are L2-normalised, so inner product is cosine similarity (ITC).

On disk (``<out>/index/``)::

    index.json     kind, backend, dim, count, parameters, the model and job that made the vectors
    vectors.npy    float32 [count, dim]: every vector in collection order (flat search, exact re-scoring)
    rows.jsonl     one line per vector: {"image": id, "source": where the image is, "text"?: ...}
    faiss.index    faiss backends: the index itself
    ivf.npz        numpy ivf: centroids and the inverted lists
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from blip.jobs.sources import Row, read_image
from blip.jobs.writer import INDEX, MANIFEST, atomic_write_json, fsync_dir, jsonl_bytes, read_jsonl

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probe logs ModuleNotFoundErrors at INFO

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw", "none")
BACKENDS = ("auto", "faiss", "numpy")
AUTO_FLAT_MAX = 100_000  # up to this many vectors an exact search takes milliseconds
INDEX_FORMAT = "blip-index/1"
_QUERY_BLOCK = 1024


class SearchIndexError(ValueError):
    """The index cannot be built, read or used as asked."""


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


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


def _top_k(scores: np.ndarray, ids: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
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
            _top_k(queries[s : s + _QUERY_BLOCK] @ self.vectors.T, None, k)
            for s in range(0, len(queries), _QUERY_BLOCK)
        ]
        if not parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def kmeans(vectors: np.ndarray, k: int, *, iterations: int = 20, seed: int = 0, sample: int = 65536) -> np.ndarray:
    """Spherical k-means (inner product) centroids [k, dim], trained on a sample of at most `sample` vectors."""
    rng = np.random.default_rng(seed)
    train = vectors if len(vectors) <= sample else vectors[rng.choice(len(vectors), sample, replace=False)]
    train = np.ascontiguousarray(train, dtype=np.float32)
    centroids = train[rng.choice(len(train), k, replace=False)].copy()
    for _ in range(iterations):
        assign = np.argmax(train @ centroids.T, axis=1)
        for c in range(k):
            members = train[assign == c]
            if len(members):
                mean = members.sum(0)
                centroids[c] = mean / max(float(np.linalg.norm(mean)), 1e-12)
            else:  # an empty cell takes a random point
                centroids[c] = train[rng.integers(len(train))]
    return centroids


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

    @classmethod
    def build(cls, vectors: np.ndarray, nlist: int, nprobe: int) -> NumpyIVFIndex:
        centroids = kmeans(vectors, nlist)
        assign = np.concatenate(
            [np.argmax(vectors[s : s + 65536] @ centroids.T, axis=1) for s in range(0, len(vectors), 65536)]
        )
        order = np.argsort(assign, kind="stable").astype(np.int64)
        offsets = np.searchsorted(assign[order], np.arange(nlist + 1)).astype(np.int64)
        return cls(vectors, centroids, order, offsets, nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores_out = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids_out = np.full((len(queries), k), -1, dtype=np.int64)
        nprobe = min(self.nprobe, len(self.centroids))
        cells = np.argpartition(-(queries @ self.centroids.T), nprobe - 1, axis=1)[:, :nprobe]
        for r, query in enumerate(queries):
            ids = np.concatenate([self.order[self.offsets[c] : self.offsets[c + 1]] for c in cells[r]])
            s, i = _top_k((self.vectors[ids] @ query)[None, :], ids, k)
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


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise SearchIndexError("the faiss backend needs faiss: pip install faiss-cpu") from e
    return faiss


def default_nlist(count: int) -> int:
    return max(1, min(count, int(round(4 * math.sqrt(count)))))


def build_index(
    vectors: np.ndarray,
    kind: str = "auto",
    backend: str = "auto",
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int = 128,
    ef_construction: int = 80,
) -> VectorIndex:
    """An index over L2-normalised `vectors` [n, dim] (inner product = cosine)."""
    if kind not in INDEX_KINDS or kind == "none":
        raise SearchIndexError(f"unknown index kind {kind!r}: use one of auto, flat, ivf, hnsw")
    if backend not in BACKENDS:
        raise SearchIndexError(f"unknown index backend {backend!r}: use one of {', '.join(BACKENDS)}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    if backend == "auto":
        backend = "faiss" if have_faiss() else "numpy"
    if kind == "auto":
        kind = "flat" if count <= AUTO_FLAT_MAX else ("hnsw" if backend == "faiss" else "ivf")
    if kind == "hnsw" and backend == "numpy":
        raise SearchIndexError(
            "an hnsw index needs faiss (pip install faiss-cpu); the numpy backend offers flat and ivf"
        )
    nlist = min(nlist or default_nlist(count), max(count, 1))
    nprobe = nprobe or max(1, min(nlist, int(math.ceil(nlist / 16))))
    if backend == "numpy":
        if kind == "flat" or count == 0:
            return NumpyFlatIndex(vectors)
        return NumpyIVFIndex.build(vectors, nlist, nprobe)
    faiss = _faiss()
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        params: dict[str, Any] = {}
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = nprobe
        params = {"nlist": nlist, "nprobe": nprobe}
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        params = {"m": hnsw_m, "ef_search": ef_search, "ef_construction": ef_construction}
    index.add(vectors)
    return FaissIndex(index, IndexInfo(kind, "faiss", dim, count, params))


# ---------------------------------------------------------------------------------------------------------------------
# The collection index of a batch output folder


@dataclass
class CollectionIndex:
    folder: Path
    index: VectorIndex
    vectors: np.ndarray
    rows: list[dict[str, Any]]
    meta: dict[str, Any]

    def row(self, i: int) -> Row:
        r = self.rows[i]
        return Row(id=r["image"], source=r.get("source", ""), text=r.get("text"))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        from blip.jobs.writer import import_pyarrow

        _, pq = import_pyarrow()
        return pq.read_table(path).to_pylist()
    return read_jsonl(path)


def _read_vectors(path: Path) -> np.ndarray:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))["embeddings"]
    return np.load(path)


def collect_embeddings(out: Path) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """Every embedding of a finished `blip batch embed` folder, in collection order, with its row."""
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("job", {}).get("task") != "embed":
        raise SearchIndexError(f"{out} is not the output of `blip batch embed`")
    if not manifest.get("complete"):
        raise SearchIndexError(f"{out}: the embed job is not finished; rerun it to complete")
    vectors, rows = [], []
    for name in sorted(manifest["shards"]):
        files = manifest["shards"][name]["files"]
        shard_rows = _read_rows(out / files[0])
        shard_vectors = _read_vectors(out / files[1])
        if len(shard_rows) != len(shard_vectors):
            raise SearchIndexError(f"{out}/{name}: {len(shard_rows)} rows but {len(shard_vectors)} vectors")
        rows += shard_rows
        vectors.append(shard_vectors)
    dim = int(manifest.get("embed_dim") or (vectors[0].shape[1] if vectors else 0))
    matrix = np.concatenate(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
    return matrix, rows, manifest


def build_collection_index(
    out: str | os.PathLike, kind: str = "auto", backend: str = "auto", **params: Any
) -> dict[str, Any]:
    """(Re)build ``<out>/index`` from the embed job's shards; written to a temporary folder, then renamed."""
    out = Path(out)
    vectors, rows, manifest = collect_embeddings(out)
    started = time.perf_counter()
    index = build_index(vectors, kind, backend, **params)
    meta = {
        "format": INDEX_FORMAT,
        **asdict(index.info),
        "job": manifest["fingerprint"],
        "model": manifest["job"].get("model"),
        "model_source": manifest.get("model_source"),
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    tmp = out / f"{INDEX}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    np.save(tmp / "vectors.npy", vectors)
    (tmp / "rows.jsonl").write_bytes(jsonl_bytes(rows))
    if isinstance(index, FaissIndex):
        _faiss().write_index(index.index, str(tmp / "faiss.index"))
    elif isinstance(index, NumpyIVFIndex):
        np.savez(tmp / "ivf.npz", centroids=index.centroids, order=index.order, offsets=index.offsets)
    atomic_write_json(tmp / "index.json", meta)
    final = out / INDEX
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(out)
    _logger.info(
        "index: %s %s over %d vectors in %.2fs", index.info.backend, index.info.kind, len(rows), meta["build_seconds"]
    )
    return meta


def index_is_current(out: Path, manifest_fingerprint: str) -> bool:
    try:
        meta = json.loads((out / INDEX / "index.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("job") == manifest_fingerprint


def load_collection_index(
    path: str | os.PathLike, *, nprobe: int | None = None, ef_search: int | None = None
) -> CollectionIndex:
    """Open an index: the `blip batch embed` output folder or its ``index`` folder."""
    folder = Path(path).expanduser()
    if (folder / INDEX / "index.json").exists():
        folder = folder / INDEX
    meta_path = folder / "index.json"
    if not meta_path.exists():
        raise SearchIndexError(f"{path}: no index here (expected {INDEX}/index.json from `blip batch embed`)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    rows = read_jsonl(folder / "rows.jsonl")
    info = IndexInfo(meta["kind"], meta["backend"], meta["dim"], meta["count"], meta.get("params", {}))
    index: VectorIndex
    if meta["backend"] == "faiss":
        faiss = _faiss()
        raw = faiss.read_index(str(folder / "faiss.index"))
        if nprobe is not None and hasattr(raw, "nprobe"):
            raw.nprobe = nprobe
        if ef_search is not None and hasattr(raw, "hnsw"):
            raw.hnsw.efSearch = ef_search
        index = FaissIndex(raw, info)
    elif meta["kind"] == "ivf":
        ivf = np.load(folder / "ivf.npz")
        index = NumpyIVFIndex(
            np.asarray(vectors),
            ivf["centroids"],
            ivf["order"],
            ivf["offsets"],
            nprobe or info.params.get("nprobe", 1),
        )
    else:
        index = NumpyFlatIndex(np.asarray(vectors))
    return CollectionIndex(folder, index, vectors, rows, meta)


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval: ITC top-k, re-ranked by ITM


@dataclass
class Hit:
    rank: int
    image: str
    source: str
    itc: float
    itm: float | None = None


def search_texts(
    blip: Blip, collection: CollectionIndex, texts: Sequence[str], *, top_k: int = 10, rerank: bool = True
) -> list[list[Hit]]:
    """For each text: the `top_k` images by ITC (cosine), re-ranked by the ITM match probability when `rerank`."""
    from blip.tasks.itm import match_probabilities, text_embeddings

    queries = text_embeddings(blip, list(texts)).numpy()
    scores, ids = collection.index.search(queries, top_k)
    results = []
    for text, row_scores, row_ids in zip(texts, scores, ids):
        hits = [_hit(collection, int(i), float(s)) for s, i in zip(row_scores, row_ids) if i >= 0]
        if rerank and hits:
            if "itm" not in blip.tasks:
                blip.require("itm")
            images, keep = [], []
            for hit in hits:
                try:
                    images.append(read_image(Row(hit.image, hit.source)))
                    keep.append(hit)
                except Exception as e:  # noqa: BLE001 - an unreadable image drops out of the ranking
                    _logger.warning("cannot re-rank %s: %s", hit.image, e)
            probs = match_probabilities(blip, images, [text] * len(keep), list(range(len(keep)))) if keep else []
            for hit, p in zip(keep, probs):
                hit.itm = p
            hits = sorted(keep, key=lambda h: (-(h.itm or 0.0), -h.itc))
        for rank, hit in enumerate(hits, start=1):
            hit.rank = rank
        results.append(hits)
    return results


def search_images(
    blip: Blip, collection: CollectionIndex, images: Sequence[Any], *, top_k: int = 10
) -> list[list[Hit]]:
    """For each query image: the `top_k` most similar images of the collection by ITC image-image cosine."""
    from blip.tasks.common import unique_images
    from blip.tasks.itm import image_embeddings

    decoded, index = unique_images(list(images))
    queries = image_embeddings(blip, decoded).numpy()[index]
    scores, ids = collection.index.search(queries, top_k)
    out = []
    for row_scores, row_ids in zip(scores, ids):
        hits = [_hit(collection, int(i), float(s)) for s, i in zip(row_scores, row_ids) if i >= 0]
        for rank, hit in enumerate(hits, start=1):
            hit.rank = rank
        out.append(hits)
    return out


def _hit(collection: CollectionIndex, i: int, score: float) -> Hit:
    row = collection.rows[i]
    return Hit(rank=0, image=row["image"], source=row.get("source", ""), itc=score)
