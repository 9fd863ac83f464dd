"""What every task needs: image inputs decoded once and de-duplicated, pairing rules, result types."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
from PIL import Image

from blip.transforms import PreparedImage, load_image, stack_prepared

if TYPE_CHECKING:
    from blip.api import Blip

ImageInput = Union[Image.Image, str, os.PathLike, bytes]  # noqa: UP007 - used at runtime in isinstance checks
MAX_TEXT_TOKENS = 35  # what the ITM/ITC and VQA checkpoints were trained and evaluated with (docs/preprocessing.md)


@dataclass
class Caption:
    text: str
    score: float
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Answer:
    text: str
    score: float
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Verdict:
    """NLVR2: whether a statement about an image pair is true. `score` = P(true); `label` = score >= 0.5."""

    label: bool
    score: float


def as_list(value: Any) -> tuple[list[Any], bool]:
    """(items, was_single): one image/text becomes a one-item list."""
    if isinstance(value, list | tuple):
        return list(value), False
    return [value], True


def _image_key(image: ImageInput) -> object:
    if isinstance(image, Image.Image):
        return ("pil", id(image))
    if isinstance(image, bytes | bytearray):
        return ("bytes", hashlib.sha1(image).hexdigest())
    return ("path", str(Path(image).expanduser().resolve()))


def unique_images(images: Sequence[ImageInput]) -> tuple[list[Image.Image], list[int]]:
    """Decode each distinct input once. Returns (distinct RGB images, index of each input into them)."""
    slots: dict[object, int] = {}
    decoded: list[Image.Image] = []
    index: list[int] = []
    for i, image in enumerate(images):
        if isinstance(image, PreparedImage):  # decoded ahead (the server, batch jobs): used as it is
            slots.setdefault(("prepared", id(image)), len(decoded))
            if slots[("prepared", id(image))] == len(decoded):
                decoded.append(image)  # type: ignore[arg-type]
            index.append(slots[("prepared", id(image))])
            continue
        if not isinstance(image, Image.Image | str | os.PathLike | bytes | bytearray):
            where = f"images[{i}]" if len(images) > 1 else "images"
            raise TypeError(
                f"{where}: expected a PIL image, a path or the bytes of an image file (or a list of these), "
                f"got {type(image).__name__}"
            )
        key = _image_key(image)
        if key not in slots:
            slots[key] = len(decoded)
            name = f"image {i}" if not isinstance(image, str | os.PathLike) else str(image)
            decoded.append(load_image(image, name=name))
        index.append(slots[key])
    return decoded, index


def pair_up(images: Any, texts: Any, what: str) -> tuple[list[ImageInput], list[str]]:
    """One image with several texts -> that image for each; lists -> pairwise (equal lengths required)."""
    image_list, single_image = as_list(images)
    text_list, single_text = as_list(texts)
    if not image_list:
        raise ValueError("no images given")
    if not text_list:
        raise ValueError(f"no {what}s given")
    if single_image and not single_text:
        image_list = image_list * len(text_list)
    elif single_text and not single_image:
        text_list = text_list * len(image_list)
    elif len(image_list) != len(text_list):
        raise ValueError(
            f"{len(image_list)} images but {len(text_list)} {what}s: give one image, one {what}, "
            f"or lists of the same length"
        )
    check_texts(text_list, what)
    return image_list, text_list


def check_texts(texts: list[Any], what: str) -> None:
    """TypeError/ValueError naming `what` and the position of the first item that is not a non-empty string."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what} {i} is {type(text).__name__}, expected a string")
        if not text.strip():
            raise ValueError(f"{what} {i} is empty")


def chunks(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def group_rows(owner: list[int], num_owners: int) -> tuple[list[int], int | None]:
    """Order rows owner-major. Returns (row order, rows per owner if every owner has the same count, else None)."""
    order = sorted(range(len(owner)), key=lambda r: owner[r])
    counts = [0] * num_owners
    for o in owner:
        counts[o] += 1
    uniform = counts[0] if counts and all(c == counts[0] for c in counts) else None
    return order, uniform


def model_input(pixel_values: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    param = next(model.parameters())
    return pixel_values.to(device=param.device, dtype=param.dtype)


def image_input(blip: Blip, images: Sequence[Image.Image | PreparedImage], model: torch.nn.Module) -> torch.Tensor:
    """`model`'s pixel input for `images`, on its device and in its dtype. Images prepared ahead at the model's size
    (`PreparedImage`) cross to the device as 8-bit pixels (non-blocking from page-locked memory) and are normalised
    there; anything else goes through `blip.transform`. The same values either way."""
    param = next(model.parameters())
    transform = blip.transform
    size = (transform.image_size, transform.image_size)
    if images and all(isinstance(im, PreparedImage) and im.size == size for im in images):
        pixels = stack_prepared(images, pin=param.device.type == "cuda")  # type: ignore[arg-type]
        return transform.normalize(pixels.to(param.device, non_blocking=True)).to(param.dtype)
    return model_input(transform(images), model)
