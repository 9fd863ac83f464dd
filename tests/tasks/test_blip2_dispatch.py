"""`blip.tasks.batch.dispatch` (the server's micro-batches and the batch jobs' rows) with BLIP-2 models: every task
gives, per work, what the Python API gives for that work alone: captions (plain and seeded), answers (with the
checkpoint's and a given prompt template), ITM, ITC similarity (max over the query features) and embeddings."""

from __future__ import annotations

import pytest
import torch

import blip
from blip.tasks.batch import CaptionWork, EmbedWork, ImageItem, PairWork, SimilarityWork, dispatch
from blip.tasks.options import CaptionOptions, VqaOptions
from oracle import make_images
from oracle_blip2 import Blip2Spec, build_blip2_checkpoint

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}
    for kind, seed in (("opt", 11), ("t5", 12), ("retrieval", 13)):
        folder = build_blip2_checkpoint(tmp_path_factory.mktemp(f"dispatch_{kind}"), Blip2Spec(kind=kind, seed=seed))
        made[kind] = blip.load(folder)
    return made


IMAGES = make_images(3, seed=5)


def items(*indices: int) -> list[ImageItem]:
    return [ImageItem(key=i, image=IMAGES[i]) for i in indices]


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_caption_works_equal_the_api_per_work(models, kind):
    m = models[kind]
    settings = {"prompt": "a photo of", "num_beams": 2, "max_new_tokens": 6}
    options = CaptionOptions(**settings)
    works = [CaptionWork(items(0, 1)), CaptionWork(items(1)), CaptionWork(items(2, 0))]
    results = dispatch(m, "caption", options, works)
    for work, result in zip(works, results):
        alone = m.caption([item.image for item in work.images], **settings)
        assert [[c.token_ids for c in per_image] for per_image in result] == [[c.token_ids] for c in alone]


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_seeded_caption_works_depend_on_their_seeds_alone(models, kind):
    m = models[kind]
    options = CaptionOptions(do_sample=True, max_new_tokens=5, num_captions=2)
    together = dispatch(m, "caption", options, [CaptionWork(items(0, 1), seeds=[7, 8]), CaptionWork(items(2), [9])])
    alone = dispatch(m, "caption", options, [CaptionWork(items(1), seeds=[8])])
    assert [c.token_ids for c in together[0][1]] == [c.token_ids for c in alone[0][0]]


@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("template", [None, "Q: {} A:"])
def test_vqa_works_equal_the_api_per_work(models, kind, template):
    m = models[kind]
    settings = {"max_new_tokens": 5, "prompt_template": template}
    options = VqaOptions(**settings)
    works = [
        PairWork(items(0), ["what is it?", "how many shapes are there?"], [0, 0]),
        PairWork(items(1, 2), ["where?", "is it red?", "what colour?"], [0, 1, 1]),
    ]
    results = dispatch(m, "vqa", options, works)
    for work, result in zip(works, results):
        images = [work.images[i].image for i in work.image_of]
        alone = m.answer(images, work.texts, **settings)
        assert [(a.text, a.token_ids) for a in result] == [(a.text, a.token_ids) for a in alone]
        assert [a.score for a in result] == pytest.approx([a.score for a in alone], abs=1e-4)


def test_match_similarity_and_embed_equal_the_api(models):
    m = models["retrieval"]
    pairs = [PairWork(items(0, 1), ["a red circle", "two squares"], [0, 1]), PairWork(items(1), ["a star"], [0])]
    probs = dispatch(m, "match", None, pairs)
    for work, result in zip(pairs, probs):
        expected = m.match([work.images[i].image for i in work.image_of], work.texts)
        assert result == pytest.approx(expected, abs=1e-5)

    sims = dispatch(m, "similarity", None, [SimilarityWork(items(0, 2), ["a dog", "a cat", "a dog"])])
    expected = m.similarity([IMAGES[0], IMAGES[2]], ["a dog", "a cat", "a dog"])
    torch.testing.assert_close(torch.tensor(sims[0]), expected, atol=1e-5, rtol=1e-5)

    (feats,) = dispatch(m, "embed", None, [EmbedWork(items(2, 0))])
    q, e = m.config.num_query_tokens, m.config.image_text_hidden_size
    assert feats.shape == (2, q, e)
    torch.testing.assert_close(torch.from_numpy(feats), m.embed_images([IMAGES[2], IMAGES[0]]), atol=1e-5, rtol=1e-5)
