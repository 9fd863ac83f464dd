"""`POST /v1/retrieve` over a real server on 127.0.0.1: a collection embedded by `blip batch embed` gives the same
results (ids, order, ITC and ITM scores) as `blip retrieve` and `search_texts`; image queries; every bad request gets
a 4xx naming its field and the server stays up; indexes that cannot be served stop the start with a clear error."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_helpers import LiveServer, b64, wait_until

import blip
from blip.jobs.cli import retrieve_main
from blip.serve import ServeSettings, create_app
from blip.serve.cli import cli_main
from blip.serve.indexes import IndexSetupError, IndexSpec, parse_indexes
from blip.serve.schemas import EXAMPLE_PNG
from blip.tasks.retrieval import load_collection_index, search_images, search_texts
from conftest import RETRIEVAL

QUERIES = ["a red circle", "two blue squares on the left of a tree"]


@pytest.fixture(scope="module")
def rc(retrieval_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=retrieval_server.url, timeout=30, trust_env=False) as c:
        yield c


def collection_image(collection_dir: Path, name: str) -> Path:
    return collection_dir.parent / "images" / name


def assert_same_hits(results: list[dict], expected: list, reranked: bool) -> None:
    assert [h["image"] for h in results] == [h.image for h in expected]
    assert [h["rank"] for h in results] == list(range(1, len(expected) + 1))
    assert [h["itc_score"] for h in results] == pytest.approx([h.itc for h in expected], abs=1e-5)
    if reranked:
        assert [h["itm_score"] for h in results] == pytest.approx([h.itm for h in expected], abs=1e-5)
    else:
        assert all(h["itm_score"] is None for h in results)


# --- the same answers as `blip retrieve` ---------------------------------------------------------------------------


def test_text_queries_equal_blip_retrieve(rc, tiny_models, collection_dir, capsys):
    collection = load_collection_index(collection_dir)
    model = tiny_models["retrieval"]
    for query in QUERIES:
        r = rc.post("/v1/retrieve", json={"text": query, "top_k": 5, "rerank": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["index"], body["model"], body["query"], body["reranked"]) == ("shapes", "retrieval", "text", True)
        assert_same_hits(body["results"], search_texts(model, collection, [query], top_k=5)[0], reranked=True)
        itm = [h["itm_score"] for h in body["results"]]
        assert itm == sorted(itm, reverse=True)

    r = rc.post("/v1/retrieve", json={"index": "shapes", "text": QUERIES[0], "top_k": 3, "rerank": False})
    assert r.status_code == 200 and r.json()["reranked"] is False
    expected = search_texts(model, collection, [QUERIES[0]], top_k=3, rerank=False)[0]
    assert_same_hits(r.json()["results"], expected, reranked=False)

    r = rc.post("/v1/retrieve", json={"text": QUERIES[1], "top_k": 50})  # more than the collection holds
    assert r.status_code == 200 and len(r.json()["results"]) == 8 and r.json()["reranked"] is True

    # the CLI, as a user runs it, on the same folder: the same ids, order and scores
    argv = ["--index", str(collection_dir), QUERIES[1], "--top-k", "4", "--format", "jsonl", "--device", "cpu"]
    assert retrieve_main(argv) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    served = rc.post("/v1/retrieve", json={"text": QUERIES[1], "top_k": 4}).json()["results"]
    assert [h["image"] for h in served] == [h["image"] for h in cli]
    assert [h["itc_score"] for h in served] == pytest.approx([h["itc"] for h in cli], abs=1e-5)
    assert [h["itm_score"] for h in served] == pytest.approx([h["itm"] for h in cli], abs=1e-5)


def test_concurrent_queries_share_a_search_and_keep_their_answers(rc, tiny_models, collection_dir):
    """Queries arriving together may share one search call on the inference thread; each keeps its own answer."""
    queries = [f"{colour} {shape}" for colour in ("red", "blue", "green") for shape in ("circle", "square")]
    with ThreadPoolExecutor(len(queries)) as pool:
        answers = list(pool.map(lambda q: rc.post("/v1/retrieve", json={"text": q, "top_k": 3}), queries))
    expected = search_texts(tiny_models["retrieval"], load_collection_index(collection_dir), queries, top_k=3)
    for answer, hits in zip(answers, expected):
        assert answer.status_code == 200, answer.text
        assert_same_hits(answer.json()["results"], hits, reranked=True)
    assert rc.get("/healthz").status_code == 200


def test_image_query_finds_the_image_itself(rc, tiny_models, collection_dir, retrieval_server):
    path = collection_image(collection_dir, "img3.png")
    r = rc.post("/v1/retrieve", json={"image": {"b64": b64(path.read_bytes())}, "top_k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "image" and body["reranked"] is False
    assert body["results"][0]["image"] == "img3.png" and body["results"][0]["itc_score"] == pytest.approx(1.0, abs=1e-4)
    expected = search_images(tiny_models["retrieval"], load_collection_index(collection_dir), [path], top_k=4)[0]
    assert_same_hits(body["results"], expected, reranked=False)

    # URLs go through the safe fetcher: a loopback address is refused before any connection
    r = rc.post("/v1/retrieve", json={"image": {"url": "http://127.0.0.1:9/img.png"}})
    assert 400 <= r.status_code < 500 and r.json()["error"]["field"] == "image.url", r.text
    assert retrieval_server.recorder.urls == []


PNG_FIELD = {"b64": EXAMPLE_PNG}
BAD = [
    ({"index": "nope", "text": "a dog"}, "index", "no index named 'nope'"),
    ({"index": 3, "text": "a dog"}, "index", "string"),
    ({"text": "a dog", "image": PNG_FIELD}, "image", "not both"),
    ({}, "text", "give a query"),
    ({"top_k": 3}, "text", "give a query"),
    ({"text": ""}, "text", "at least 1 character"),
    ({"text": "  \t"}, "text", "must not be empty"),
    ({"text": "x" * 1001}, "text", "over the limit of 1000"),
    ({"text": "a dog", "top_k": 0}, "top_k", "greater than or equal to 1"),
    ({"text": "a dog", "top_k": 101}, "top_k", "over this server's limit of 100"),
    ({"text": "a dog", "top_k": 1001}, "top_k", "less than or equal to 1000"),
    ({"text": "a dog", "top_k": "many"}, "top_k", "integer"),
    ({"text": "a dog", "rerank": "maybe"}, "rerank", "boolean"),
    ({"image": PNG_FIELD, "rerank": True}, "rerank", "ITC similarity only"),
    ({"image": {}}, "image", "exactly one of 'url' or 'b64'"),
    ({"image": {"b64": "not base64 at all!"}}, "image.b64", "not valid base64"),
    ({"image": {"b64": b64(b"just some text, not an image")}}, "image.b64", "not an image"),
    ({"text": "a dog", "colour": "red"}, "colour", "Extra inputs"),
]


def test_bad_requests_get_4xx_naming_the_field(rc):
    for body, field, fragment in BAD:
        r = rc.post("/v1/retrieve", json=body)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        error = r.json()["error"]
        assert error["field"] == field and error["message"].startswith(field), (body, error)
        assert fragment in error["message"], (body, error)
    assert rc.get("/readyz").status_code == 200
    assert rc.post("/v1/retrieve", json={"text": "a dog", "top_k": 2}).status_code == 200


# --- several indexes, a model without ITM, loading -----------------------------------------------------------------


class ItcOnly(blip.Blip):
    """A model with an ITC head but no ITM head (as a feature-extraction checkpoint would be)."""

    @property
    def tasks(self) -> set[str]:
        return {"itc"}


def test_several_indexes_and_a_model_without_itm(tiny_models, collection_dir):
    real = tiny_models["retrieval"]
    itc_only = ItcOnly(real.model, real.tokenizer, real.transform, source=real.source)
    models = {"retrieval": real, "itc-only": itc_only}
    indexes = {"a": collection_dir, "b": IndexSpec(str(collection_dir), model="itc-only")}
    with LiveServer(create_app(models, ServeSettings(), indexes=indexes)) as live:
        with httpx.Client(base_url=live.url, timeout=30, trust_env=False) as c:
            assert c.get("/readyz").json()["indexes"] == ["a", "b"]
            listed = {i["name"]: (i["model"], i["count"], i["kind"]) for i in c.get("/v1/indexes").json()["indexes"]}
            assert listed == {"a": ("retrieval", 8, "flat"), "b": ("itc-only", 8, "flat")}
            r = c.post("/v1/retrieve", json={"text": "a dog"})
            assert r.status_code == 422 and r.json()["error"]["field"] == "index" and "several" in r.text
            r = c.post("/v1/retrieve", json={"index": "b", "text": "a dog", "rerank": True})
            assert r.status_code == 422 and r.json()["error"]["field"] == "rerank" and "no ITM head" in r.text
            r = c.post("/v1/retrieve", json={"index": "b", "text": "a dog", "top_k": 3})  # default: ITC order
            assert r.status_code == 200 and r.json()["reranked"] is False and r.json()["model"] == "itc-only"
            expected = search_texts(real, load_collection_index(collection_dir), ["a dog"], top_k=3, rerank=False)[0]
            assert_same_hits(r.json()["results"], expected, reranked=False)
            assert c.post("/v1/retrieve", json={"index": "a", "text": "a dog"}).json()["reranked"] is True


def test_ready_only_once_the_indexes_are_loaded(tiny_models, collection_dir):
    app = create_app(loader=lambda: {"r": tiny_models["retrieval"]}, indexes={"shapes": collection_dir})
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30, trust_env=False) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 20)
        assert c.get("/readyz").json()["indexes"] == ["shapes"]
        assert c.post("/v1/retrieve", json={"text": "a dog", "top_k": 2}).json()["model"] == "r"

    failed: list[BaseException] = []
    loader = lambda: {"captioner": tiny_models["captioner"]}  # noqa: E731 - no retrieval model for the index
    app = create_app(loader=loader, indexes={"shapes": collection_dir}, on_load_error=failed.append)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30, trust_env=False) as c:
        wait_until(lambda: bool(failed), 20)
        r = c.get("/readyz")
        reason = r.json()["reason"]
        assert r.status_code == 503 and reason.startswith("index loading failed"), reason
        assert f"--index shapes={collection_dir}" in reason and "not among the served retrieval models" in reason
        assert c.post("/v1/retrieve", json={"text": "a dog"}).status_code == 503


# --- start-up checks ---------------------------------------------------------------------------------------------


def _edited_copy(collection_dir: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(collection_dir / "index", copy / "index")
    meta_path = copy / "index" / "index.json"
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    meta_path.write_text(json.dumps(meta))
    return copy


def test_indexes_that_cannot_be_served_stop_the_start(tiny_models, collection_dir, tmp_path):
    def refused(indexes, *fragments):
        with pytest.raises(IndexSetupError) as info:
            create_app(tiny_models, ServeSettings(), indexes=indexes)
        for fragment in fragments:
            assert fragment in str(info.value), str(info.value)

    refused({"x": tmp_path / "missing"}, f"--index x={tmp_path / 'missing'}: no such folder")
    refused({"x": IndexSpec(str(collection_dir), model="captioner")}, "model 'captioner' has no ITC head")
    refused({"x": IndexSpec(str(collection_dir), model="nosuch")}, "no model named 'nosuch'")

    other = _edited_copy(collection_dir, tmp_path, model={"sha256": "0" * 64}, model_source="/elsewhere/ckpt")
    refused({"x": other}, f"--index x={other}", "embedded by /elsewhere/ckpt", "not among the served retrieval models")
    refused({"x": IndexSpec(str(other), model="retrieval")}, "is not the checkpoint that embedded this collection")

    shutil.rmtree(other)
    unrecorded = _edited_copy(collection_dir, tmp_path, model=None)
    refused({"x": unrecorded}, "does not record its model", "@MODEL")
    app = create_app(tiny_models, ServeSettings(), indexes={"x": IndexSpec(str(unrecorded), model="retrieval")})
    assert app.state.service.indexes["x"].model == "retrieval"

    shutil.rmtree(unrecorded)
    refused({"x": _edited_copy(collection_dir, tmp_path, dim=7)}, "1 x 7 features per image", "embeds 1 x")


def test_index_flags(hf_checkpoints, collection_dir, tmp_path, capsys):
    specs = parse_indexes(["photos=/a/b@retrieval", "/x/out/index", "c=/y@z"], models=["retrieval"])
    assert specs == {"photos": IndexSpec("/a/b", "retrieval"), "out": IndexSpec("/x/out/index"), "c": IndexSpec("/y@z")}
    with pytest.raises(ValueError, match="used twice"):
        parse_indexes(["a=/x", "a=/y"], models=[])

    model = f"r={hf_checkpoints(RETRIEVAL)}"
    assert cli_main(["--model", model, "--index", f"x={tmp_path}"]) == 2  # exits before loading anything
    assert f"--index x={tmp_path}: no index/index.json here" in capsys.readouterr().err
    assert cli_main(["--model", model, "--index", f"x={tmp_path / 'gone'}"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli_main(["--model", model, "--index", f"x={collection_dir}@nosuch"]) == 2
    assert "no model named 'nosuch'" in capsys.readouterr().err
