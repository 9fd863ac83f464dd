"""Per-image random generators make nucleus sampling independent of which images share the batch."""

from __future__ import annotations

import pytest
import torch

from blip.tasks.caption import caption_images
from blip.tasks.options import CaptionOptions
from oracle import make_images

torch.set_num_threads(1)

SAMPLING = CaptionOptions(max_new_tokens=12, do_sample=True, top_p=0.9, top_k=50, num_captions=3).generation()


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_each_image_samples_from_its_own_generator(models):
    captioner, _ = models
    images = make_images(5, seed=3)
    together = caption_images(
        captioner, images, prompt="a picture of ", generation=SAMPLING, generators=_generators(range(5))
    )
    for i in (0, 3):
        alone = caption_images(
            captioner, [images[i]], prompt="a picture of ", generation=SAMPLING, generators=_generators([i])
        )[0]
        assert [c.token_ids for c in alone] == [c.token_ids for c in together[i]]
        assert [c.score for c in alone] == pytest.approx([c.score for c in together[i]], abs=1e-4)
    # the same image with another seed samples something else; sequences of one image differ from each other
    other = caption_images(
        captioner, images[:1], prompt="a picture of ", generation=SAMPLING, generators=_generators([9])
    )
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in together[0]]
    assert len({tuple(c.token_ids) for c in together[0]}) > 1


def test_one_generator_per_image_is_required(models):
    captioner, _ = models
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        caption_images(captioner, make_images(3), prompt=None, generation=SAMPLING, generators=_generators([1, 2]))
