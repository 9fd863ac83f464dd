"""Retrieval at collection scale: `blip batch embed` + index search gives the brute-force R@1/R@10 (flat index), the
approximate index stays close, query latency is measured for both (a test property and an INFO log line:
`pytest --log-cli-level=INFO` shows it); `blip retrieve` re-ranks by ITM."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch

import blip
from blip.evaluation.retrieval_metrics import recall_at_k
from blip.jobs.cli import batch_main, retrieve_main
from blip.jobs.index import build_collection_index
from blip.tasks.retrieval import have_faiss, load_collection_index, search_texts


def _shapes(root, n):
    from blip.data import shapes

    shapes.generate(
        root,
        seed=0,
        n_clean=0,
        n_web=n,
        n_vqa=0,
        n_test=0,
        progress=False,
        workers=2,
        cfg=shapes.ShapesConfig(image_size=32),
    )
    return [json.loads(line) for line in (root / "web.jsonl").read_text().splitlines()]


def _recalls(ids: np.ndarray) -> tuple[float, float]:
    truth = np.arange(len(ids))[:, None]
    return 100.0 * float(np.mean(ids[:, :1] == truth)), 100.0 * float(np.mean((ids[:, :10] == truth).any(1)))


def _latency_ms(index, queries: np.ndarray, n: int = 200) -> float:
    index.search(queries[:1], 10)
    started = time.perf_counter()
    for q in queries[:n]:
        index.search(q[None], 10)
    return (time.perf_counter() - started) / min(n, len(queries)) * 1000


@pytest.mark.parametrize("n", [1000, 10_000])
def test_text_to_image_search_equals_brute_force(retrieval_model, tmp_path, record_property, n):
    rows = _shapes(tmp_path / "world", n)
    out = tmp_path / "embedded"
    argv = ["embed", "-m", str(retrieval_model), "-i", str(tmp_path / "world" / "web.jsonl"), "-o", str(out)]
    assert batch_main([*argv, "--index", "flat", "--batch-size", "64", "--shard-size", "1000", "--workers", "0"]) == 0
    flat = load_collection_index(out)
    assert [r["image"] for r in flat.rows] == [r["id"] for r in rows]

    # brute force, independently of the batch job: the Python API's features and the evaluation code
    model = blip.load(retrieval_model, batch_size=64)
    image_feats = model.embed_images([str(tmp_path / "world" / r["image"]) for r in rows])
    text_feats = model.embed_texts([r["caption"] for r in rows])
    np.testing.assert_allclose(np.asarray(flat.vectors), image_feats.numpy(), atol=1e-5)
    brute = recall_at_k(image_feats @ text_feats.T, list(range(n)), [[i] for i in range(n)], ks=(1, 10))
    queries = text_feats.numpy()

    _, flat_ids = flat.index.search(queries, 10)
    assert _recalls(flat_ids) == pytest.approx((brute["ir_r1"], brute["ir_r10"]), abs=1e-9)
    exact = torch.topk(text_feats @ image_feats.T, 10, dim=1)
    agree = float(np.mean(flat_ids == exact.indices.numpy()))
    assert agree > 0.999, agree  # the same top-10 lists (up to float ties)
    self_ids = flat.index.search(image_feats.numpy(), 1)[1][:, 0]
    assert (self_ids == np.arange(n)).all()  # every image finds itself first

    kind = "hnsw" if have_faiss() else "ivf"
    meta = build_collection_index(out, kind)
    approx = load_collection_index(out, nprobe=32, ef_search=256)
    _, approx_ids = approx.index.search(queries, 10)
    approx_r1, approx_r10 = _recalls(approx_ids)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx_ids, exact.indices.numpy())])
    assert overlap > 0.85 and approx_r10 >= brute["ir_r10"] - 1.0
    assert np.mean(approx.index.search(image_feats.numpy(), 1)[1][:, 0] == np.arange(n)) > 0.95

    flat_ms, approx_ms = _latency_ms(flat.index, queries), _latency_ms(approx.index, queries)
    measurement = (
        f"[retrieval n={n}] brute force R@1={brute['ir_r1']:.2f} R@10={brute['ir_r10']:.2f} | "
        f"flat ({flat.index.info.backend}) R@1/R@10 equal, {flat_ms:.3f} ms/query | {meta['backend']} {kind} "
        f"R@1={approx_r1:.2f} R@10={approx_r10:.2f}, top-10 overlap {overlap:.3f}, {approx_ms:.3f} ms/query"
    )
    record_property("retrieval", measurement)  # in the JUnit XML (--junitxml), not on the terminal
    logging.getLogger(__name__).info(measurement)


def test_numpy_backend_flat_and_ivf(retrieval_model, tmp_path):
    """Without faiss: the numpy flat index is exact, the numpy IVF one close."""
    from blip.jobs.index import build_index

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 24))
    vectors = (centres[rng.integers(0, 40, 3000)] + 0.4 * rng.normal(size=(3000, 24))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:300] + 0.05 * rng.normal(size=(300, 24)).astype(np.float32)
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    flat = build_index(vectors, "flat", "numpy")
    scores, ids = flat.search(queries, 10)
    assert (ids == exact).all() and (np.diff(scores, axis=1) <= 0).all()
    ivf = build_index(vectors, "ivf", "numpy")
    _, ivf_ids = ivf.search(queries, 10)
    assert np.mean([len(set(a) & set(b)) for a, b in zip(ivf_ids, exact)]) / 10 > 0.9
    assert (ivf_ids[:, 0] == np.arange(300)).mean() > 0.95


def test_retrieve_cli_reranks_by_itm(retrieval_model, image_folder, tmp_path, capsys):
    folder, good, _ = image_folder
    out = tmp_path / "embedded"
    assert batch_main(["embed", "-m", str(retrieval_model), "-i", str(folder), "-o", str(out)]) == 1  # bad files
    query = "a red circle on the left of a blue square"
    assert retrieve_main(["--index", str(out), query, "--top-k", "5", "--format", "jsonl"]) == 0
    captured = capsys.readouterr()
    hits = [json.loads(line) for line in captured.out.splitlines()]
    assert "ms" in captured.err and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]

    model = blip.load(retrieval_model)
    sims = model.similarity([str(folder / g) for g in good], query)[:, 0]
    top5 = [good[i] for i in torch.topk(sims, 5).indices.tolist()]
    assert sorted(h["image"] for h in hits) == sorted(top5)  # the ITC top-5 ...
    itm = model.match([str(folder / h["image"]) for h in hits], query)
    assert [h["itm"] for h in hits] == pytest.approx(itm, abs=1e-4)
    assert [h["itc"] for h in hits] == pytest.approx([float(sims[good.index(h["image"])]) for h in hits], abs=1e-5)
    assert [h["itm"] for h in hits] == sorted((h["itm"] for h in hits), reverse=True)  # ... re-ranked by ITM

    collection = load_collection_index(out)
    no_rerank = search_texts(model, collection, [query], top_k=5, rerank=False)[0]
    assert [h.image for h in no_rerank] == top5 and all(h.itm is None for h in no_rerank)

    assert retrieve_main(["--index", str(out), "--image", str(folder / good[3]), "--top-k", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split("\t")[1] == good[3]  # an image finds itself first

    assert retrieve_main(["--index", str(tmp_path), "a query"]) == 2
    assert "no index here" in capsys.readouterr().err
