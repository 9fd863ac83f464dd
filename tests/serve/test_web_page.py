"""The web page at GET / in headless Chromium (Playwright driving Debian's /usr/bin/chromium): choose an image, see
its caption, ask a question, see the answer, score texts and explain one (Grad-CAM maps); a screenshot is kept as a
test artifact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serve_helpers import LiveServer, artifacts_dir

from blip.serve import ServeSettings, create_app
from blip.transforms import load_image

CHROMIUM = Path("/usr/bin/chromium")
expect = None  # playwright.sync_api.expect, set when the browser starts
ARGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-gpu"]
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    global expect
    expect = sync_api.expect
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        launched.close()


@pytest.mark.browser
def test_page_captions_answers_and_scores(browser, tiny_models, images, tmp_path):
    photo = tmp_path / "photo.png"
    images[0].resize((180, 120)).save(photo)
    decoded = load_image(str(photo))
    expected_caption = tiny_models["captioner"].caption(decoded)[0].text
    candidates = ["what is in the picture?", "how many dogs?", "where is the star?", "what colour is the sky?"]
    answers = [a.text for a in tiny_models["vqa"].answer(decoded, candidates)]
    question, expected_answer = next(((q, a) for q, a in zip(candidates, answers) if a), (candidates[0], answers[0]))

    with LiveServer(create_app(tiny_models, ServeSettings())) as live:
        page = browser.new_page(viewport={"width": 900, "height": 1000})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(f"{live.url}/")
        expect(page.locator("#models")).to_contain_text("captioner", timeout=TIMEOUT_MS)

        page.set_input_files("#file", str(photo))
        expect(page.locator("#caption")).to_have_text(expected_caption or "(empty)", timeout=TIMEOUT_MS)
        expect(page.locator("#caption-score")).to_contain_text("log-prob")

        page.fill("#question", question)
        page.click("#ask")
        # (a random tiny model may answer with no words: the page shows that as "(empty)")
        expect(page.locator("#answer")).to_have_text(expected_answer or "(empty)", timeout=TIMEOUT_MS)
        expect(page.locator("#answer-score")).to_contain_text("log-prob")

        page.fill("#texts", "a red circle\ntwo dogs on the beach")
        page.click("#score-btn")
        expect(page.locator("#scores tr")).to_have_count(3, timeout=TIMEOUT_MS)
        rows = page.locator("#scores tr").all_inner_texts()
        assert "two dogs on the beach" in rows[2]

        page.locator("#scores tr").nth(2).locator("button").click()  # explain: a map for the text and each word
        expect(page.locator("#explain-maps figure")).to_have_count(6, timeout=TIMEOUT_MS)
        expect(page.locator("#explain-title")).to_contain_text("P(match)")
        labels = page.locator("#explain-maps figcaption").all_inner_texts()
        assert labels == ["whole text", "two", "dogs", "on", "the", "beach"]
        loaded = "(img) => img.complete && img.naturalWidth > 0"
        assert all(img.evaluate(loaded) for img in page.locator("#explain-maps img").all())

        shot = tmp_path / "web_page.png"
        page.screenshot(path=str(shot), full_page=True)
        page.close()
    assert problems == [], problems  # no script errors, no Content-Security-Policy violations
    assert shot.stat().st_size > 1000
    folder = artifacts_dir()
    if folder is not None:
        shutil.copy(shot, folder / "serve_web_page.png")
