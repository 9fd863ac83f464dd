"""Golden outputs of the published checkpoints on BLIP's demo image (docs/evaluation.md, golden outputs).

These need the real weights in the local Hugging Face cache and the demo image (BLIP's `demo.jpg`, the woman and
her dog on the beach) at $BLIP_DEMO_IMAGE; they are skipped, with the reason, where either is missing. Users with
the weights run them: `BLIP_DEMO_IMAGE=demo.jpg pytest -m regression tests/test_regression.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import blip

pytestmark = pytest.mark.regression


def cached(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pytest.skip(f"{repo_id} is not in the local Hugging Face cache")


@pytest.fixture(scope="module")
def demo_image() -> Path:
    path = os.environ.get("BLIP_DEMO_IMAGE")
    if not path or not Path(path).exists():
        pytest.skip("set BLIP_DEMO_IMAGE to BLIP's demo.jpg to run the golden-output tests")
    return Path(path)


def test_caption_base_golden(demo_image):
    model = blip.load(cached("Salesforce/blip-image-captioning-base"))
    plain = model.caption(demo_image, max_new_tokens=19)[0]
    assert plain.token_ids == [30522, 1037, 2450, 3564, 2006, 1996, 3509, 2007, 2014, 3899, 102]
    assert plain.text == "a woman sitting on the beach with her dog"
    prompted = model.caption(demo_image, prompt="a picture of", max_new_tokens=16)[0]
    assert prompted.token_ids == [30522, 1037, 3861, 1997, 1037, 2450, 1998, 2014, 3899, 2006, 1996, 3509, 102]
    assert prompted.text == "a picture of a woman and her dog on the beach"


def test_caption_base_interpolated_golden(demo_image):
    model = blip.load(cached("Salesforce/blip-image-captioning-base"), image_size=500)
    result = model.caption(demo_image, max_new_tokens=19)[0]
    assert result.token_ids == [30522, 1037, 2450, 3564, 2006, 1996, 3509, 2007, 1037, 3899, 102]


def test_vqa_base_golden(demo_image):
    model = blip.load(cached("Salesforce/blip-vqa-base"))
    answer = model.answer(demo_image, "how many dogs are in the picture?")[0]
    assert answer.token_ids == [30522, 1015, 102]
    assert answer.text == "1"


def test_itm_base_coco_golden(demo_image):
    model = blip.load(cached("Salesforce/blip-itm-base-coco"))
    text = "A woman and her dog sitting in a beach"
    assert model.match(demo_image, text)[0] == pytest.approx(0.9971, abs=1e-3)
    assert model.similarity(demo_image, text)[0, 0].item() == pytest.approx(0.5162, abs=1e-3)
