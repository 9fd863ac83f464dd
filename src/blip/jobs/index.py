"""Build the search index of a `blip batch embed` output folder (``<out>/index/``): a flat, IVF or HNSW index
(faiss when installed, else numpy) over the collection's L2-normalised ITC embeddings. Reading an index and searching
it (ITC top-k, ITM re-rank) is `blip.tasks.retrieval`, where the server and `blip retrieve` find it; the on-disk
layout is described there.

A BLIP-2 collection (shards of ``[rows, Q, dim]``) is indexed as all rows * Q vectors, image i's query features at
vectors i * Q .. i * Q + Q - 1; ``auto`` picks the kind by that vector count.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from blip.io import atomic_write_json, fsync_dir, jsonl_bytes, read_jsonl
from blip.jobs.writer import MANIFEST
from blip.tasks.retrieval import (
    INDEX,
    INDEX_FORMAT,
    INDEX_FORMAT_BLIP2,
    FaissIndex,
    IndexInfo,
    NumpyFlatIndex,
    NumpyIVFIndex,
    SearchIndexError,
    VectorIndex,
    have_faiss,
    import_faiss,
)

_logger = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probe logs ModuleNotFoundErrors at INFO

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw", "none")
BACKENDS = ("auto", "faiss", "numpy")
AUTO_FLAT_MAX = 100_000  # up to this many vectors an exact search takes milliseconds


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


def build_numpy_ivf(vectors: np.ndarray, nlist: int, nprobe: int) -> NumpyIVFIndex:
    """Inverted lists over `nlist` k-means cells of `vectors`."""
    centroids = kmeans(vectors, nlist)
    assign = np.concatenate(
        [np.argmax(vectors[s : s + 65536] @ centroids.T, axis=1) for s in range(0, len(vectors), 65536)]
    )
    order = np.argsort(assign, kind="stable").astype(np.int64)
    offsets = np.searchsorted(assign[order], np.arange(nlist + 1)).astype(np.int64)
    return NumpyIVFIndex(vectors, centroids, order, offsets, nprobe)


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
        return build_numpy_ivf(vectors, nlist, nprobe)
    faiss = import_faiss()
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
    """Every embedding of a finished `blip batch embed` folder, in collection order, with its row: [rows, dim]
    (BLIP) or [rows, Q, dim] (BLIP-2)."""
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
    if len({v.shape[1:] for v in vectors}) > 1:
        raise SearchIndexError(f"{out}: the shards hold embeddings of different shapes")
    matrix = np.concatenate(vectors).astype(np.float32) if vectors else np.zeros((0, 0), np.float32)
    return matrix, rows, manifest


def build_collection_index(
    out: str | os.PathLike, kind: str = "auto", backend: str = "auto", **params: Any
) -> dict[str, Any]:
    """(Re)build ``<out>/index`` from the embed job's shards; written to a temporary folder, then renamed."""
    out = Path(out)
    vectors, rows, manifest = collect_embeddings(out)
    started = time.perf_counter()
    blip2 = vectors.ndim == 3  # [rows, Q, dim]: one feature per query token
    index = build_index(vectors.reshape(-1, vectors.shape[-1]) if blip2 else vectors, kind, backend, **params)
    per_image = vectors.shape[1] if blip2 else 1
    meta = {
        "format": INDEX_FORMAT_BLIP2 if blip2 else INDEX_FORMAT,
        "family": "blip2" if blip2 else "blip",
        **asdict(index.info),
        "count": len(rows),  # images (rows.jsonl lines); the search index holds count * vectors_per_image vectors
        "vectors_per_image": per_image,
        "vectors": index.info.count,
        "job": manifest["fingerprint"],
        "model": manifest["job"].get("model"),
        "model_source": manifest.get("model_source"),
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    described = manifest["job"].get("input", {})
    if described.get("media") == "video":  # a video collection: re-ranking reads each hit's frames
        meta.update(media="video", num_frames=int(described["num_frames"]))
    tmp = out / f"{INDEX}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    np.save(tmp / "vectors.npy", vectors)
    (tmp / "rows.jsonl").write_bytes(jsonl_bytes(rows))
    if isinstance(index, FaissIndex):
        import_faiss().write_index(index.index, str(tmp / "faiss.index"))
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


def current_index(out: Path, job_fingerprint: str, kind: str = "auto") -> dict[str, Any] | None:
    """The metadata of ``<out>/index`` when it indexes the vectors of job `job_fingerprint` and is of `kind` (any
    kind for "auto"), read once; None when it must be (re)built."""
    try:
        meta = json.loads((out / INDEX / "index.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("job") == job_fingerprint and kind in ("auto", meta.get("kind")) else None
