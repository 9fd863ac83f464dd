"""Images decoded ahead as 8-bit pixels (`PreparedImage`): the same model input as the PIL images they came from,
whichever way they are gathered, normalised on the pixels' own device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from blip.tasks.common import image_input, model_input
from blip.transforms import ImageTransform, PreparedImage, stack_prepared, to_rgb
from oracle import make_images

SIZE = 24


@pytest.fixture
def pil() -> list[Image.Image]:
    return [to_rgb(im, size=SIZE) for im in make_images(5, seed=7)]


def _batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images]))


def test_prepared_images_give_the_pil_input_exactly(pil):
    transform = ImageTransform(image_size=SIZE)
    expected = transform(pil)
    batch = _batch(pil)
    prepared = [PreparedImage(batch, i) for i in range(len(pil))]
    assert stack_prepared(prepared) is batch  # the whole batch in order: no copy
    assert torch.equal(transform(prepared), expected)
    order = [3, 0, 3, 1]  # a subset, out of order, one twice
    assert torch.equal(transform([prepared[i] for i in order]), expected[order])
    singles = [PreparedImage(_batch([im]), 0) for im in pil]  # the server: a batch of one per image
    assert torch.equal(transform(singles), expected)
    mixed = [singles[2], pil[0], prepared[4]]  # with PIL images among them
    assert torch.equal(transform(mixed), expected[[2, 0, 4]])
    assert torch.equal(transform.normalize(batch), expected)


def test_prepared_images_of_another_size_are_resized_like_pil(pil):
    transform = ImageTransform(image_size=16)
    prepared = [PreparedImage(_batch(pil), i) for i in range(2)]
    assert prepared[0].size == (SIZE, SIZE) and prepared[0].tobytes() == pil[0].tobytes()
    assert torch.equal(transform(prepared), transform(pil[:2]))


def test_pinning_is_skipped_without_a_gpu(pil):
    batch = _batch(pil)
    out = stack_prepared([PreparedImage(batch, 1), PreparedImage(batch, 0)], pin=True)
    assert torch.equal(out, batch[[1, 0]]) and (torch.cuda.is_available() or not out.is_pinned())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_input_equals_the_transform_path(pil, dtype):
    class Blip:
        transform = ImageTransform(image_size=SIZE)

    module = torch.nn.Linear(2, 2).to(dtype)
    prepared = [PreparedImage(_batch(pil), i) for i in range(len(pil))]
    got = image_input(Blip(), prepared, module)
    want = model_input(Blip.transform(pil), module)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(image_input(Blip(), pil, module), want)  # PIL images: the transform, as before
