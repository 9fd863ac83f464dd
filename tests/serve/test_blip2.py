"""BLIP-2 models served (issue 17), beside BLIP models in one server, over real HTTP on 127.0.0.1: every schema (our
/v1 routes, the model card's, Azure ML's) answers exactly what the Python API answers; the bad-input battery holds
for BLIP-2 models; BLIP-2's own limits (the OPT length check, rank mode, prompt templates) are 4xx naming the field;
concurrent requests about one image share its encoding; the web page picks a BLIP-2 model."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import test_bad_inputs as battery
import test_web_page as web
import torch
from serve_helpers import LiveServer, ServeProcess, b64, png_bytes, wait_until

import blip
from blip.serve import ServeSettings, create_app

pytest.importorskip("transformers")

browser = web.browser  # the headless Chromium fixture of the web page test

QUESTIONS = [["what is in the picture?", "how many shapes?", "where is the star?"], ["what colour is it?"]]
TEMPLATE = "Q: {} A:"
LONG = "is the big red shape on the left of the small blue one, or is it the other way round in this picture?"


def ref(image) -> dict[str, str]:
    return {"b64": b64(png_bytes(image))}


@pytest.fixture(scope="module")
def mixed(mixed_models) -> dict[str, blip.Blip]:
    return mixed_models


@pytest.fixture(scope="module")
def server(blip2_server):
    return blip2_server


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as c:
        yield c


def captions_out(response: httpx.Response) -> list[list[tuple[str, list[int], float]]]:
    assert response.status_code == 200, response.text
    return [[(c["text"], c["token_ids"], c["score"]) for c in r["captions"]] for r in response.json()["results"]]


def same_captions(got: list[tuple[str, list[int], float]], expected: list) -> None:
    assert [(text, ids) for text, ids, _ in got] == [(c.text, c.token_ids) for c in expected]
    assert [score for _, _, score in got] == pytest.approx([c.score for c in expected], abs=1e-4)


# --- every schema answers what the Python API answers ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_v1_caption_and_vqa_equal_the_python_api(client, blip2_models, images, name):
    m = blip2_models[name]
    r = client.post("/v1/caption", json={"images": [ref(images[0]), ref(images[1])], "model": name})
    for got, expected in zip(captions_out(r), m.caption(images[:2])):
        same_captions(got, [expected])

    options = {"prompt": "a photo of", "num_beams": 3, "num_captions": 2, "max_new_tokens": 8}
    r = client.post("/v1/caption", json={"images": [ref(images[2])], "model": name, **options})
    same_captions(captions_out(r)[0], m.caption(images[2], **options)[0])

    sampled = {"do_sample": True, "seed": 7, "top_k": 5, "max_new_tokens": 6}
    r = client.post("/v1/caption", json={"images": [ref(images[0])], "model": name, **sampled})
    same_captions(captions_out(r)[0], m.caption(images[0], **sampled))

    for template in (None, TEMPLATE):
        body = {"images": [ref(images[0]), ref(images[1])], "questions": QUESTIONS, "model": name}
        r = client.post("/v1/vqa", json={**body, "prompt_template": template, "num_beams": 2})
        assert r.status_code == 200, r.text
        for image, questions, result in zip(images, QUESTIONS, r.json()["results"]):
            expected = m.answer(image, questions, prompt_template=template, num_beams=2)
            got = result["answers"]
            assert [a["question"] for a in got] == questions
            assert [(a["text"], a["token_ids"]) for a in got] == [(a.text, a.token_ids) for a in expected]
            assert [a["score"] for a in got] == pytest.approx([a.score for a in expected], abs=1e-4)


def test_v1_match_and_similarity_equal_the_python_api(client, blip2_models, images):
    m, texts = blip2_models["itm"], ["a red circle on the left", "two dogs on the beach", "a star"]
    r = client.post("/v1/match", json={"images": [ref(images[0])], "texts": texts})  # no model: the first, BLIP-2's
    assert r.status_code == 200 and r.json()["model"] == "itm", r.text
    assert r.json()["scores"] == pytest.approx(m.match(images[0], texts), abs=1e-4)
    r = client.post("/v1/match", json={"images": [ref(images[0]), ref(images[1])], "texts": texts[:2]})
    assert r.json()["scores"] == pytest.approx(m.match(images[:2], texts[:2]), abs=1e-4)

    r = client.post("/v1/similarity", json={"images": [ref(images[0]), ref(images[1])], "texts": texts})
    assert r.status_code == 200, r.text
    expected = m.similarity(images[:2], texts)  # [images, texts]: the largest cosine over the query features
    assert expected.shape == (2, 3)
    assert r.json()["scores"] == [pytest.approx(row, abs=1e-4) for row in expected.tolist()]

    files = [("images", ("a.png", png_bytes(images[1]), "image/png"))]
    r = client.post("/v1/similarity/upload", files=files, data={"texts": texts, "model": "itm"})
    assert r.json()["scores"][0] == pytest.approx(m.similarity(images[1], texts)[0].tolist(), abs=1e-4)


def test_v1_embed_gives_one_feature_per_query_token_for_blip2(client, mixed, images):
    """`embed_images`: BLIP-2 `[n, Q, E]`, BLIP `[n, E]`; the response's `shape` says which."""
    for name in ("itm", "retrieval"):
        expected = mixed[name].embed_images(images[:2])
        r = client.post("/v1/embed", json={"images": [ref(images[0]), ref(images[1])], "model": name})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == name and body["shape"] == list(expected.shape)
        torch.testing.assert_close(torch.tensor(body["embeddings"]), expected, atol=1e-5, rtol=1e-5)
    q, e = mixed["itm"].config.num_query_tokens, mixed["itm"].config.image_text_hidden_size
    files = [("images", ("a.png", png_bytes(images[3]), "image/png"))]
    r = client.post("/v1/embed/upload", files=files)  # no model: the first able, BLIP-2's
    assert r.json()["model"] == "itm" and r.json()["shape"] == [1, q, e]
    battery.check_error(client.post("/v1/embed", json={"images": [ref(images[0])], "model": "opt"}), 422, "model")


@pytest.mark.parametrize("path", ["/", "/predict"])
def test_model_card_schema(client, blip2_models, images, path):
    """Several questions per image (the schema's point), answered by the first VQA model (BLIP-2 OPT here)."""
    opt, t5 = blip2_models["opt"], blip2_models["t5"]
    body = {"inputs": {"texts": QUESTIONS, "images": [ref(images[0]), ref(images[1])]}}
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    expected = [[a.text for a in opt.answer(image, qs)] for image, qs in zip(images, QUESTIONS)]
    assert r.json() == {"captions": [{"image_results": answers} for answers in expected]}

    six = ["what is it?", "how many?", "where?", "what colour?", "is it round?", "why?"]
    r = client.post(path, params={"model": "t5"}, json={"inputs": {"texts": [six], "images": [ref(images[2])]}})
    assert r.json() == {"captions": [{"image_results": [a.text for a in t5.answer(images[2], six)]}]}

    r = client.post(path, json={"inputs": {"images": [ref(images[2]), ref(images[3])]}})  # no texts: captions
    assert r.json() == {"captions": [{"image_results": [c.text]} for c in opt.caption(images[2:4])]}


def test_azure_ml_schema(client, blip2_models, tiny_models, images):
    """A BLIP-2 OPT or T5 model captions ["image"] rows and answers ["image", "text"] rows; BLIP models in the same
    server keep their own behaviour (a caption-only model takes the text as the prompt)."""
    opt, t5 = blip2_models["opt"], blip2_models["t5"]

    def score(columns: list[str], data: list[list[str]], **kwargs) -> list[str]:
        r = client.post("/score", json={"input_data": {"columns": columns, "data": data}}, **kwargs)
        assert r.status_code == 200, r.text
        return [x["text"] for x in r.json()]

    images_only = [[b64(png_bytes(images[0]))], [b64(png_bytes(images[1]))]]
    assert score(["image"], images_only) == [c.text for c in opt.caption(images[:2])]
    assert score(["image"], images_only, params={"model": "t5"}) == [c.text for c in t5.caption(images[:2])]

    questions = ["what is in the picture?", "how many shapes?", "where is the star?"]
    rows = [[b64(png_bytes(images[i])), q] for i, q in zip([0, 1, 0], questions)]
    by_row = [images[0], images[1], images[0]]
    assert score(["image", "text"], rows) == [a.text for a in opt.answer(by_row, questions)]
    deployment = {"azureml-model-deployment": "t5"}
    assert score(["image", "text"], rows, headers=deployment) == [a.text for a in t5.answer(by_row, questions)]
    vqa = tiny_models["vqa"]
    assert score(["image", "text"], rows, params={"model": "vqa"}) == [a.text for a in vqa.answer(by_row, questions)]
    captioner = tiny_models["captioner"]
    prompted = [captioner.caption(image, prompt=q)[0].text for image, q in zip(by_row, questions)]
    assert score(["image", "text"], rows, params={"model": "captioner"}) == prompted


def test_models_list_shows_family_kind_tasks_and_template(client, server, blip2_models):
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert list(models) == ["opt", "t5", "itm", "captioner", "vqa", "retrieval", "nlvr"]
    got = {n: (m["family"], m["kind"], m["tasks"], m["prompt_template"]) for n, m in models.items()}
    assert got == {
        "opt": ("blip2", "opt", ["caption", "vqa"], "Question: {} Answer:"),
        "t5": ("blip2", "t5", ["caption", "vqa"], "Question: {} Answer:"),
        "itm": ("blip2", "retrieval", ["itc", "itm"], None),
        "captioner": ("blip", "caption", ["caption"], None),
        "vqa": ("blip", "vqa", ["vqa"], None),
        "retrieval": ("blip", "retrieval", ["itc", "itm"], None),
        "nlvr": ("blip", "nlvr", ["reason"], None),
    }
    assert models["opt"]["source"] == blip2_models["opt"].source
    assert client.get("/readyz").json()["models"] == sorted(models)


# --- errors ----------------------------------------------------------------------------------------------------------


def test_blip2_limits_are_4xx_naming_the_field(client, server, images):
    good = ref(images[0])
    cases = [
        # rank mode is BLIP VQA's; a template needs its "{}"; BLIP VQA takes no template
        ("/v1/vqa", {"images": [good], "questions": [["q?"]], "answers": ["yes", "no"]}, "answers", "BLIP-2"),
        ("/v1/vqa", {"images": [good], "questions": [["q?"]], "prompt_template": "Q: A:"}, "prompt_template", "{}"),
        ("/v1/vqa", {"images": [good], "questions": [["q?"]], "model": "vqa", "prompt_template": TEMPLATE}, None, ""),
        # the OPT length check: 4 query tokens + prompt + max_new_tokens within the LM's 64 positions
        ("/v1/caption", {"images": [good], "prompt": LONG * 2}, "prompt", "64 positions"),
        ("/v1/caption", {"images": [good], "prompt": "a photo of", "max_new_tokens": 60}, "max_new_tokens", "64"),
        ("/v1/vqa", {"images": [good], "questions": [["ok?", LONG]]}, "questions[0][1]", "question in its prompt"),
        (
            "/v1/vqa",
            {"images": [good], "questions": [["ok?"]], "prompt_template": LONG * 2 + " {}"},
            "prompt_template",
            "",
        ),
        ("/", {"inputs": {"texts": [["ok?"], [LONG]], "images": [good, good]}}, "inputs.texts[1][0]", "64 positions"),
        # tasks a kind does not have
        ("/v1/caption", {"images": [good], "model": "itm"}, "model", "cannot caption"),
        ("/v1/match", {"images": [good], "texts": ["a dog"], "model": "opt"}, "model", "cannot match"),
        ("/v1/similarity", {"images": [good], "texts": ["a dog"], "model": "t5"}, "model", "cannot compare"),
    ]
    for path, body, field, words in cases:
        error = battery.check_error(client.post(path, json=body), 422, field, words)
        if field is None:
            assert error["field"] == "prompt_template" and "BLIP-2" in error["message"], error
    rows = [[good["b64"], "ok?"], [good["b64"], LONG]]
    r = client.post("/score", json={"input_data": {"columns": ["image", "text"], "data": rows}})
    battery.check_error(r, 422, "input_data.data[1][1]", "question in its prompt")

    # T5 has relative positions: no length limit
    r = client.post("/v1/vqa", json={"images": [good], "questions": [[LONG]], "model": "t5", "max_new_tokens": 60})
    assert r.status_code == 200, r.text
    assert client.get("/readyz").status_code == 200


def test_bad_input_battery_with_blip2_models(client, server, good, bomb):
    """The battery of tests/serve/test_bad_inputs.py against a server whose default models are BLIP-2's (the case
    asking a model that cannot caption names the BLIP-2 retrieval model instead of BLIP's VQA model)."""
    for name, path, body, status, field, words in battery.json_cases(good, bomb):
        if name == "wrong task":
            body = {**body, "model": "itm"}
        response = client.post(path, json=body)
        try:
            battery.check_error(response, status, field, *words)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from e
    battery.test_request_pixel_budget(client, server)
    battery.test_bad_uploads(client)
    assert server.recorder.urls == []  # not one connection attempted
    r = client.post("/v1/caption", json={"images": [good]})
    assert r.status_code == 200 and r.json()["model"] == "opt"


@pytest.fixture(scope="module")
def good(images) -> dict[str, str]:
    return {"b64": b64(png_bytes(images[0]))}


@pytest.fixture(scope="module")
def bomb() -> str:
    return b64(battery.png_bomb())


# --- micro-batching ---------------------------------------------------------------------------------------------------


def test_concurrent_requests_share_an_images_encoding(blip2_models, images, monkeypatch):
    """Six clients each ask one question about the same image (the model card's case, one question per request):
    the requests merge into one model call, the image goes through the vision encoder once, and every answer is the
    Python API's for that question alone."""
    m = blip2_models["opt"]
    six = ["what is it?", "how many?", "where?", "what colour?", "is it round?", "why?"]
    expected = [m.answer(images[1], q)[0] for q in six]
    app = create_app({"opt": m}, ServeSettings(max_batch=16, max_wait_ms=50))
    service = app.state.service
    rows: list[int] = []
    encode = m.model.encode_image
    monkeypatch.setattr(m.model, "encode_image", lambda pixels: (rows.append(pixels.shape[0]), encode(pixels))[1])
    gate, run_batch = threading.Event(), service.batcher.runner
    calls: list[int] = []

    def held(key, payloads):
        calls.append(len(payloads))
        assert gate.wait(20)
        return run_batch(key, payloads)

    service.batcher.runner = held
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:

        def ask(question: str) -> dict:
            r = c.post("/v1/vqa", json={"images": [ref(images[1])], "questions": [[question]]})
            assert r.status_code == 200, r.text
            return r.json()["results"][0]["answers"][0]

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(ask, q) for q in six]
            wait_until(lambda: sum(calls) + service.batcher.depth == 6)  # all queued, the first batch held
            gate.set()
            got = [f.result(timeout=60) for f in futures]
    assert sum(calls) == 6 and len(calls) < 6  # fewer model calls than requests
    assert rows == [1] * len(calls)  # each call: one image through the ViT, whatever its number of questions
    assert [(a["text"], a["token_ids"]) for a in got] == [(a.text, a.token_ids) for a in expected]
    assert [a["score"] for a in got] == pytest.approx([a.score for a in expected], abs=1e-4)


# --- the web page -----------------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_page_picks_blip2_models(browser, server, mixed, images, tmp_path):
    from blip.transforms import load_image

    photo = tmp_path / "photo.png"
    images[2].resize((120, 90)).save(photo)
    decoded = load_image(str(photo))
    t5, captioner = mixed["t5"], mixed["captioner"]
    question = "what is in the picture?"
    expected_answer = t5.answer(decoded, question, prompt_template=TEMPLATE)[0].text
    expected_caption = captioner.caption(decoded)[0].text
    texts = ["a red circle", "two dogs on the beach"]
    expected_match = mixed["itm"].match(decoded, texts)

    page = browser.new_page(viewport={"width": 900, "height": 1100})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(f"{server.url}/")
    web.expect(page.locator("#models")).to_contain_text("t5 (BLIP-2 t5)", timeout=web.TIMEOUT_MS)
    options = page.locator("#vqa-model option").all_inner_texts()
    assert options == ["opt (BLIP-2 opt)", "t5 (BLIP-2 t5)", "vqa (BLIP vqa)"]
    assert page.locator("#match-model option").all_inner_texts() == [
        "itm (BLIP-2 retrieval)",
        "retrieval (BLIP retrieval)",
    ]

    page.select_option("#caption-model", "captioner")
    page.set_input_files("#file", str(photo))
    web.expect(page.locator("#caption")).to_have_text(expected_caption or "(empty)", timeout=web.TIMEOUT_MS)

    page.select_option("#vqa-model", "vqa")
    web.expect(page.locator("#template-box")).to_be_hidden()  # BLIP VQA takes no template
    page.select_option("#vqa-model", "t5")
    web.expect(page.locator("#template")).to_have_attribute("placeholder", "Question: {} Answer:")
    page.fill("#template", TEMPLATE)
    page.fill("#question", question)
    page.click("#ask")
    web.expect(page.locator("#answer")).to_have_text(expected_answer or "(empty)", timeout=web.TIMEOUT_MS)

    page.fill("#texts", "\n".join(texts))
    page.click("#score-btn")  # the first model able: BLIP-2's ITM
    web.expect(page.locator("#scores tr")).to_have_count(3, timeout=web.TIMEOUT_MS)
    rows = page.locator("#scores tr").all_inner_texts()
    assert [f"{p:.3f}" in row for p, row in zip(expected_match, rows[1:])] == [True, True]
    page.close()
    assert problems == [], problems


# --- the command line -------------------------------------------------------------------------------------------------


def test_blip_serve_with_a_blip2_model(blip2_models, tiny_models, images, tmp_path):
    """`blip serve --model vqa2=<BLIP-2 folder> --dtype ...` as the issue runs it (bfloat16 here: this is a CPU), with
    a BLIP model beside it: six questions about one image in the model card's schema, answered as the Python API
    answers them in that dtype."""
    folder = blip2_models["opt"].source
    six = ["what is it?", "how many?", "where?", "what colour?", "is it round?", "why?"]
    expected = [a.text for a in blip.load(folder, dtype="bfloat16").answer(images[0], six)]
    args = ["--model", f"vqa2={folder}", "--model", f"cap={tiny_models['captioner'].source}", "--dtype", "bfloat16"]
    server = ServeProcess([*args, "--device", "cpu"], tmp_path / "serve.log").wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as c:
            r = c.post("/predict", json={"inputs": {"texts": [six], "images": [ref(images[0])]}})
            assert r.status_code == 200, r.text
            assert r.json() == {"captions": [{"image_results": expected}]}
            kinds = {m["name"]: (m["family"], m["kind"]) for m in c.get("/v1/models").json()["models"]}
            assert kinds == {"vqa2": ("blip2", "opt"), "cap": ("blip", "caption")}
    finally:
        assert server.stop() == 0, server.log()
