"""A collection embedded by a tiny BLIP-2 retrieval checkpoint (`blip batch embed`): the index holds every query
feature, and text search ranks images by the largest cosine over their Q features, equal to brute force with
`Blip2.similarity` for flat indexes (numpy and faiss) and for IVF probing every cell; re-ranking uses the BLIP-2 ITM
head (`Blip2.match`); `blip retrieve` and `/v1/retrieve` give the same hits; image queries and a model of the other
family are refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from jobs_helpers import one_line

import blip
from blip.jobs.cli import batch_main, retrieve_main
from blip.jobs.index import build_collection_index, build_index
from blip.tasks.retrieval import (
    CollectionIndex,
    SearchIndexError,
    have_faiss,
    load_collection_index,
    search_images,
    search_texts,
)
from oracle import make_images
from oracle_blip2 import Blip2Spec, build_blip2_checkpoint

pytest.importorskip("transformers")

N_IMAGES = 30
QUERIES = ["a red circle", "two blue squares on the left", "a tree", "something green and round"]
BACKENDS = ["numpy", "faiss"] if have_faiss() else ["numpy"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """(checkpoint, loaded model, image paths, embed output folder with a flat index)."""
    root = tmp_path_factory.mktemp("b2_collection")
    checkpoint = build_blip2_checkpoint(root / "retrieval", Blip2Spec(kind="retrieval", seed=51))
    folder = root / "images"
    folder.mkdir()
    for i, image in enumerate(make_images(N_IMAGES, seed=52)):
        image.save(folder / f"img{i:02d}.png")
    out = root / "embedded"
    argv = ["embed", "-m", str(checkpoint), "-i", str(folder), "-o", str(out), "--index", "flat", "--no-progress"]
    assert batch_main([*argv, "--batch-size", "8"]) == 0
    paths = [str(folder / f"img{i:02d}.png") for i in range(N_IMAGES)]
    return checkpoint, blip.load(checkpoint), paths, out


@pytest.fixture(scope="module")
def similarity(collection) -> dict[str, list[float]]:
    """Per query, every image's similarity by the Python API (`Blip2.similarity`: max over the query features)."""
    _, model, paths, _ = collection
    sims = model.similarity(paths, QUERIES)
    return {query: sims[:, t].tolist() for t, query in enumerate(QUERIES)}


def _brute_force(similarity, paths, query: str, k: int) -> tuple[list[str], list[float]]:
    """The k best images for `query` by the API's similarity, best first (ties: the earlier image)."""
    sims = similarity[query]
    order = sorted(range(len(paths)), key=lambda i: (-sims[i], i))[:k]
    return [Path(paths[i]).name for i in order], [sims[i] for i in order]


def test_the_index_holds_every_query_feature(collection):
    _, model, paths, out = collection
    index = load_collection_index(out)
    q, e = model.config.num_query_tokens, model.config.image_text_hidden_size
    assert index.family == "blip2" and index.per_image == q and q > 1
    assert index.vectors.shape == (N_IMAGES, q, e) and len(index.rows) == N_IMAGES
    assert (index.meta["format"], index.meta["count"], index.meta["vectors"]) == (
        "blip-index/2",
        N_IMAGES,
        N_IMAGES * q,
    )
    np.testing.assert_allclose(np.asarray(index.vectors), model.embed_images(paths).numpy(), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_text_search_equals_brute_force_max_over_queries(collection, similarity, backend, kind):
    """Flat indexes are exact; an IVF index probing all its cells is exact the same way (top k * Q vectors, the best
    per image)."""
    _, model, paths, out = collection
    meta = build_collection_index(out, kind, backend, nlist=6 if kind == "ivf" else None)
    try:
        index = load_collection_index(out, nprobe=meta["params"].get("nlist"))
        assert (index.index.info.kind, index.index.info.backend) == (kind, backend)
        for k in (1, 7, N_IMAGES, N_IMAGES + 5):
            hits = search_texts(model, index, QUERIES, top_k=k, rerank=False)
            for query, found in zip(QUERIES, hits):
                names, scores = _brute_force(similarity, paths, query, k)
                assert [h.image for h in found] == names, (query, k)
                assert [h.itc for h in found] == pytest.approx(scores, abs=1e-5)
                assert [h.rank for h in found] == list(range(1, len(names) + 1)) and all(h.itm is None for h in found)
    finally:
        build_collection_index(out, "flat")  # the module's other tests search the flat index


@pytest.mark.skipif(not have_faiss(), reason="hnsw needs faiss")
def test_hnsw_search_is_close(collection, similarity):
    _, model, paths, out = collection
    build_collection_index(out, "hnsw")
    try:
        index = load_collection_index(out, ef_search=256)
        hits = search_texts(model, index, QUERIES, top_k=7, rerank=False)
        overlap = np.mean(
            [
                len({h.image for h in found} & set(_brute_force(similarity, paths, q, 7)[0])) / 7
                for q, found in zip(QUERIES, hits)
            ]
        )
        assert overlap >= 0.85 and all(len({h.image for h in found}) == 7 for found in hits)  # no image twice
    finally:
        build_collection_index(out, "flat")


def test_the_k_times_q_bound_on_adversarial_collections():
    """Images whose Q features crowd the top of the vector ranking (the case the k * Q hits are for), random ones
    and exact ties: the owner ranking equals brute force max over each image's features."""
    rng = np.random.default_rng(0)
    n, q, e = 200, 8, 16
    queries = rng.normal(size=(20, e)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    vectors = rng.normal(size=(n, q, e)).astype(np.float32)
    vectors[:12] = queries[0] + 0.1 * rng.normal(size=(12, q, e))  # 12 images, all 8 features near query 0
    vectors[150:153] = vectors[3]  # three images equal to another: ties go to the smaller row
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    sims = np.einsum("nqe,te->tnq", vectors, queries).max(axis=2)  # [t, n]
    meta = {"family": "blip2", "vectors_per_image": q, "dim": e}
    for kind in ("flat", "ivf"):
        index = build_index(vectors.reshape(-1, e), kind, "numpy", nlist=10, nprobe=10)
        coll = CollectionIndex(Path("."), index, vectors, [{"image": str(i)} for i in range(n)], meta)
        for k in (1, 5, 12, 13, 40):
            scores, ids = coll.search(queries, k)
            for t in range(len(queries)):
                expected = sorted(range(n), key=lambda i: (-sims[t, i], i))[:k]
                assert ids[t].tolist() == expected, (kind, k, t)
                np.testing.assert_allclose(scores[t], sims[t, expected], atol=1e-6)


def test_rerank_uses_the_blip2_itm_head(collection, similarity):
    _, model, paths, out = collection
    index = load_collection_index(out)
    for query, found in zip(QUERIES, search_texts(model, index, QUERIES, top_k=5)):
        names, _ = _brute_force(similarity, paths, query, 5)
        assert sorted(h.image for h in found) == sorted(names)  # the ITC top 5 ...
        folder = Path(paths[0]).parent
        expected = model.match([str(folder / h.image) for h in found], query)
        assert [h.itm for h in found] == pytest.approx(expected, abs=1e-5)
        assert [h.itm for h in found] == sorted((h.itm for h in found), reverse=True)  # ... re-ranked by ITM


def test_blip_retrieve_and_v1_retrieve_give_the_same_hits(collection, capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
    import httpx
    from serve_helpers import LiveServer, b64

    from blip.serve import ServeSettings, create_app

    _, model, paths, out = collection
    expected = search_texts(model, load_collection_index(out), QUERIES[:2], top_k=4)
    assert retrieve_main(["--index", str(out), *QUERIES[:2], "--top-k", "4", "--format", "jsonl"]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(h["query"], h["image"]) for h in cli] == [(q, h.image) for q, hits in zip(QUERIES, expected) for h in hits]
    assert [h["itm"] for h in cli] == pytest.approx([h.itm for hits in expected for h in hits], abs=1e-5)

    app = create_app({"blip2": model}, ServeSettings(max_wait_ms=5.0), indexes={"shapes": out})
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30, trust_env=False) as client:
        for query, hits in zip(QUERIES, expected):
            r = client.post("/v1/retrieve", json={"text": query, "top_k": 4})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["model"], body["reranked"]) == ("blip2", True)
            assert [h["image"] for h in body["results"]] == [h.image for h in hits]
            assert [h["itc_score"] for h in body["results"]] == pytest.approx([h.itc for h in hits], abs=1e-5)
            assert [h["itm_score"] for h in body["results"]] == pytest.approx([h.itm for h in hits], abs=1e-5)
        info = client.get("/v1/indexes").json()["indexes"][0]
        assert (info["count"], info["dim"]) == (N_IMAGES, model.config.image_text_hidden_size)
        r = client.post("/v1/retrieve", json={"image": {"b64": b64(Path(paths[0]).read_bytes())}})
        assert r.status_code == 422 and "not supported for BLIP-2 indexes" in r.json()["error"]["message"]
        assert client.post("/v1/retrieve", json={"text": QUERIES[0]}).status_code == 200  # still serving


def test_image_queries_and_the_other_family_are_refused(collection, retrieval_model, tmp_path, capsys):
    checkpoint, model, paths, out = collection
    assert retrieve_main(["--index", str(out), "--image", paths[0]]) == 2
    assert "image queries are not supported for BLIP-2 indexes" in one_line(capsys.readouterr().err)
    with pytest.raises(SearchIndexError, match="not supported for BLIP-2"):
        search_images(model, load_collection_index(out), [paths[0]])

    # a BLIP index (the BLIP tests' tiny retrieval model) and a BLIP-2 model, both ways
    blip_out = tmp_path / "blip_embedded"
    argv = ["embed", "-m", str(retrieval_model), "-i", str(Path(paths[0]).parent), "-o", str(blip_out)]
    assert batch_main([*argv, "--limit", "6", "--no-progress"]) == 0
    capsys.readouterr()
    blip_model = blip.load(retrieval_model)
    with pytest.raises(SearchIndexError, match="holds BLIP features .* but the model .* is BLIP-2"):
        search_texts(model, load_collection_index(blip_out), ["a dog"])
    with pytest.raises(SearchIndexError, match="holds BLIP-2 features .* but the model .* is BLIP:"):
        search_texts(blip_model, load_collection_index(out), ["a dog"])
    with pytest.raises(SearchIndexError, match="holds BLIP-2 features"):
        search_images(blip_model, load_collection_index(out), [paths[0]])
    assert retrieve_main(["--index", str(out), "--model", str(retrieval_model), "a dog"]) == 2
    assert "not the checkpoint that embedded this collection" in one_line(capsys.readouterr().err)
    meta_path = out / "index" / "index.json"  # an index that records no checkpoint: the family check speaks
    meta = json.loads(meta_path.read_text())
    try:
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "model"}))
        assert retrieve_main(["--index", str(out), "--model", str(retrieval_model), "a dog"]) == 2
        assert "holds BLIP-2 features" in one_line(capsys.readouterr().err)
    finally:
        meta_path.write_text(json.dumps(meta))

    # a BLIP-2 model whose query features have another shape
    other = blip.load(build_blip2_checkpoint(tmp_path / "q2", Blip2Spec(kind="retrieval", num_query_tokens=2)))
    with pytest.raises(SearchIndexError, match=r"4 x 16 features per image, but the model .* embeds 2 x 16"):
        search_texts(other, load_collection_index(out), ["a dog"])

    # the server refuses the mismatched model at start-up, naming the index (not per query)
    from blip.serve import ServeSettings, create_app
    from blip.serve.indexes import IndexSetupError, IndexSpec

    with pytest.raises(IndexSetupError, match=r"--index x=.*model 'other'.*not the checkpoint that embedded"):
        create_app({"other": other}, ServeSettings(), indexes={"x": IndexSpec(str(out), model="other")})
    try:  # an index that records no checkpoint: the feature shape speaks
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "model"}))
        with pytest.raises(IndexSetupError, match=r"--index x=.*model 'other'.*embeds 2 x 16"):
            create_app({"other": other}, ServeSettings(), indexes={"x": IndexSpec(str(out), model="other")})
    finally:
        meta_path.write_text(json.dumps(meta))
