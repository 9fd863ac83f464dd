"""Image decoding and preprocessing.

- `load_image`: path / bytes / PIL image -> 8-bit RGB PIL image, refusing oversized and broken data up front, and
  optionally resized to the model's square input at once (`size`: exactly the resize `ImageTransform` does, so the
  full-size image lives only for the decode; the server and batch jobs use it).
- `ImageTransform`: evaluation preprocessing, equal to transformers' BlipImageProcessor (PIL backend): RGB conversion
  (transparency composited onto white), bicubic resize of the 8-bit image to a square (no crop, aspect not kept),
  x/255, CLIP mean/std normalisation -> float32 [B, 3, S, S].
- `PreparedImage`: an image decoded ahead to 8-bit RGB at the model's size, as a row of a uint8 batch tensor (batch
  jobs' decode workers and the server's decode threads make them; `ImageTransform.normalize` finishes them on the
  model's device, so only 8-bit pixels are copied there).
- `TrainTransform`: the original BLIP training augmentation (RandomResizedCrop, flip, RandAugment), PIL only.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from blip.tokenizer import _read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Images over 64 megapixels (e.g. 8000x8000) are refused before their pixel data is decoded: a decoded RGB image of
# that size already takes 192 MB. Pillow's own guard (Image.MAX_IMAGE_PIXELS, ~89.5 MP) also applies and is reported
# the same way, so raising max_pixels above it has no effect unless Image.MAX_IMAGE_PIXELS is raised too.
DEFAULT_MAX_PIXELS = 64_000_000
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"  # transformers 5 nests the image processor's settings here
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value transformers stores as "resample"

ImageSource = Image.Image | str | os.PathLike | bytes | bytearray | memoryview
T = TypeVar("T")


class ImageDecodeError(ValueError):
    """An input could not be turned into an image. The message starts with the input's name and gives the reason."""


def load_image(
    source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None, size: int | None = None
) -> Image.Image:
    """Decode `source` into an RGB PIL image (`size`: resized to size x size as `ImageTransform` would).

    Paths and bytes: the header is read first and images over `max_pixels` are refused before decoding; EXIF
    orientation is applied; the pixel data is fully decoded here, so empty, non-image, truncated or corrupt data (and
    unreadable files) raise `ImageDecodeError` naming `name` (default: the path, or "bytes"). A PIL image is used as
    it is (no EXIF rotation, no size limit). Either way the result goes through `to_rgb`.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source, name=name or "image", size=size)
    if isinstance(source, bytes | bytearray | memoryview):
        name = name or "bytes"
        data = bytes(source)
        if not data:
            raise ImageDecodeError(f"{name}: empty data (0 bytes)")
        fp: io.BytesIO | Path = io.BytesIO(data)
    elif isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        name = name or str(source)
        file_size(path, name, "an image file", ImageDecodeError)
        fp = path
    else:
        raise TypeError(f"{name or 'image'}: expected a PIL image, a path or bytes, got {type(source).__name__}")
    return _decode(fp, name, max_pixels, size)


def file_size(path: Path, name: str, what: str, error: type[ImageDecodeError]) -> int:
    """The size in bytes of the file at `path`; `error` naming `name` when it cannot be read, is a directory (not
    `what`) or is empty."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise error(f"{name}: cannot read file ({e.strerror or e})") from e
    if path.is_dir():
        raise error(f"{name}: is a directory, not {what}")
    if size == 0:
        raise error(f"{name}: empty file (0 bytes)")
    return size


def image_dimensions(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "bytes") -> tuple[int, int]:
    """(width, height) read from the header alone (no pixel data decoded); the same refusals as `load_image` for data
    that is not an image or is over `max_pixels`."""
    if not data:
        raise ImageDecodeError(f"{name}: empty data (0 bytes)")
    return _open(io.BytesIO(data), name, max_pixels, lambda opened: opened.size)


def _decode(fp: io.BytesIO | Path, name: str, max_pixels: int, size: int | None) -> Image.Image:
    """Decode, apply EXIF orientation in place and convert (and resize) while the file is open, so the full-size
    image is never copied."""

    def convert(opened: Image.Image) -> Image.Image:
        opened.load()  # decode everything now, so truncated data fails here and not later
        ImageOps.exif_transpose(opened, in_place=True)
        image = to_rgb(opened, name=name, size=size)
        return opened.copy() if image is opened else image  # `opened` is closed on return, its pixels with it

    return _open(fp, name, max_pixels, convert)


def _open(fp: io.BytesIO | Path, name: str, max_pixels: int, work: Callable[[Image.Image], T]) -> T:
    """`work(image)` on the opened image once its size is checked, with every failure as an `ImageDecodeError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"{name}: image is {width}x{height} = {width * height} pixels, over the "
                        f"limit of {max_pixels} (max_pixels); refused before decoding"
                    )
                return work(opened)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"{name}: image too large, refused before decoding ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"{name}: not an image in a format Pillow can read") from e
    except MemoryError as e:
        raise ImageDecodeError(f"{name}: out of memory while decoding") from e
    except OSError as e:
        if isinstance(fp, Path) and e.errno is not None:
            raise ImageDecodeError(f"{name}: cannot read file ({e.strerror or e})") from e
        raise ImageDecodeError(f"{name}: truncated or corrupt image data ({e})") from e
    except Exception as e:  # Pillow's plugins raise SyntaxError, ValueError, struct.error, EOFError, ...
        raise ImageDecodeError(f"{name}: corrupt image data ({type(e).__name__}: {e})") from e


GREY_MODES = ("L", "LA", "La")  # one colour band: R = G = B after conversion
STRIP_PIXELS = 1 << 18  # transparency is composited this many pixels at a time


def to_rgb(image: Image.Image, *, name: str = "image", size: int | None = None) -> Image.Image:
    """transformers' `convert_to_rgb`: an image with an alpha band or a transparency key is converted to RGBA and
    composited onto opaque white; anything else goes through Pillow's `convert("RGB")` (grey, palette, CMYK, YCbCr;
    32-bit and 16-bit integer and float modes are clipped to 0..255, not rescaled, exactly as transformers does).
    RGB images without transparency are returned as they are.

    `size`: the result is resized to size x size (bicubic, as `ImageTransform` does): the same pixels as
    `to_rgb(image).resize(...)`, with less memory: a grey image is resized in its one band and expanded to RGB after.
    Transparency is composited a strip of rows at a time, never on full-size RGBA copies."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            image = _composite_on_white(image, "L" if image.mode in GREY_MODES else "RGB")
        elif image.mode in ("L", "1") and size is not None:
            image = image if image.mode == "L" else image.convert("L")  # "1" -> 0/255, as its RGB bands would be
        elif image.mode != "RGB":
            image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return image if image.mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageDecodeError(f"{name}: cannot convert mode {image.mode} to RGB ({e})") from e


def _composite_on_white(image: Image.Image, mode: str) -> Image.Image:
    """`alpha_composite(white, image.convert("RGBA")).convert(mode)` a strip of rows at a time (each step works
    pixel by pixel, so the pixels are the same): the only full-size image it makes is the result."""
    width, height = image.size
    out = Image.new(mode, image.size)
    rows = max(1, STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        rgba = image.crop((0, top, width, min(top + rows, height))).convert("RGBA")
        strip = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        out.paste(strip.getchannel("R") if mode == "L" else strip.convert("RGB"), (0, top))
    return out


def _normalisation_table(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[3, 256] float32: the normalised value of every 8-bit level per channel, computed with the same operations
    (and roundings) as transformers: float64 x*(1/255) -> float32, then (x - mean) / std in float32."""
    levels = (torch.arange(256, dtype=torch.float64) * (1 / 255)).to(torch.float32)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None]
    return (levels[None, :] - mean_t) / std_t


@functools.lru_cache(maxsize=16)
def _device_table(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """`_normalisation_table` on `device`, made once (a copy to a GPU per batch would wait for the GPU's queue)."""
    return _normalisation_table(mean, std).to(device)


def _to_tensor(images: Sequence[Image.Image], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """8-bit RGB images of one size -> normalised float32 [B, 3, H, W]."""
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)
    table = _normalisation_table(mean, std)
    out = torch.empty(pixels.shape, dtype=torch.float32)
    for c in range(3):  # a table lookup per channel: exact, and faster than the arithmetic
        out[:, c] = table[c][pixels[:, c].int()]
    return out


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """An image decoded to 8-bit RGB at a square size ahead of the model (batch jobs' decode workers, the server's
    decode threads): row `index` of `batch`, uint8 [N, S, S, 3] on any device (pinned host memory or the GPU), so
    that only 8-bit pixels cross to the device and the normalisation runs there (`ImageTransform.normalize`)."""

    batch: torch.Tensor
    index: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL says it."""
        return int(self.batch.shape[2]), int(self.batch.shape[1])

    def tobytes(self) -> bytes:
        """The RGB bytes, row by row: what PIL's `tobytes()` gives for the same image."""
        return self.batch[self.index].cpu().numpy().tobytes()

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.batch[self.index].cpu().numpy(), "RGB")


def stack_prepared(images: Sequence[PreparedImage], *, pin: bool = False) -> torch.Tensor:
    """uint8 [B, S, S, 3] of prepared images (of one size), on their batch's device: that batch itself when the
    images are all of it in order (no copy), else gathered (into page-locked memory when `pin`, for a fast
    non-blocking copy to a GPU)."""
    first = images[0].batch
    pin = pin and first.device.type == "cpu" and torch.cuda.is_available()  # page-locked memory needs a GPU
    if all(im.batch is first for im in images):
        if len(images) == first.shape[0] and all(im.index == i for i, im in enumerate(images)):
            return first
        index = torch.tensor([im.index for im in images], device=first.device)
        out = None
        if pin:
            out = torch.empty((len(images), *first.shape[1:]), dtype=torch.uint8, pin_memory=True)
        return torch.index_select(first, 0, index, out=out) if out is not None else first.index_select(0, index)
    rows = [im.batch[im.index].to(first.device) for im in images]
    if pin:
        return torch.stack(rows, out=torch.empty((len(rows), *rows[0].shape), dtype=torch.uint8, pin_memory=True))
    return torch.stack(rows)


@dataclass(frozen=True)
class ImageTransform:
    """Evaluation preprocessing; equals transformers' BlipImageProcessor (PIL backend) bit for bit."""

    image_size: int = 384
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __call__(self, images: Image.Image | PreparedImage | Sequence[Image.Image | PreparedImage]) -> torch.Tensor:
        """PIL images (any size, any mode) -> float32 [B, 3, S, S]. Prepared images at the model's size are only
        normalised (on their device); at another size they are resized like PIL images."""
        if isinstance(images, Image.Image | PreparedImage):
            images = [images]
        size = (self.image_size, self.image_size)
        if images and all(isinstance(im, PreparedImage) and im.size == size for im in images):
            return self.normalize(stack_prepared(images))  # type: ignore[arg-type]
        pil = [im.to_pil() if isinstance(im, PreparedImage) else im for im in images]
        resized = [to_rgb(im, name=f"image {i}", size=self.image_size) for i, im in enumerate(pil)]
        if not resized:
            return torch.empty(0, 3, *size)
        return _to_tensor(resized, self.mean, self.std)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """8-bit RGB uint8 [B, S, S, 3] (any device) -> normalised float32 [B, 3, S, S] on that device: the same
        values as for the PIL images (one table lookup per channel)."""
        table = _device_table(self.mean, self.std, pixels.device)
        channels = pixels.permute(0, 3, 1, 2)
        out = torch.empty(channels.shape, dtype=torch.float32, device=pixels.device)
        for c in range(3):
            out[:, c] = table[c][channels[:, c].int()]
        return out

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ImageTransform:
        """Settings from `folder`'s image-processor config (or that file's path); defaults when there is none.

        As transformers 5 reads them: the "image_processor" entry of processor_config.json (what transformers 5's
        processors save, e.g. Blip2Processor) first, else preprocessor_config.json (the hub repos' file)."""
        path = Path(folder)
        if path.is_dir() or not path.suffix:
            nested = _nested_image_processor(path / PROCESSOR_FILE)
            if nested is not None:
                return cls._from_config(nested, path / PROCESSOR_FILE)
            path = path / PREPROCESSOR_FILE
        elif path.name == PROCESSOR_FILE:
            nested = _nested_image_processor(path)
            if nested is None:
                raise ValueError(f"{path} has no image_processor settings")
            return cls._from_config(nested, path)
        if not path.is_file():
            return cls()
        return cls._from_config(_read_json(path), path)

    @classmethod
    def _from_config(cls, config: dict, path: Path) -> ImageTransform:
        size = config.get("size", 384)
        if isinstance(size, dict):
            if "height" not in size or "width" not in size or size["height"] != size["width"]:
                raise ValueError(f"{path}: size {size} is not a square {{'height': S, 'width': S}}")
            size = size["height"]
        unsupported = {
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "resample": BICUBIC,
            "do_center_crop": False,
            "do_pad": False,
        }
        for key, expected in unsupported.items():
            if config.get(key, expected) not in (expected, None):
                raise ValueError(
                    f"{path}: {key}={config[key]!r} is not supported (BLIP preprocessing needs {expected})"
                )
        if not math.isclose(config.get("rescale_factor", 1 / 255), 1 / 255, rel_tol=1e-9):
            raise ValueError(f"{path}: rescale_factor {config['rescale_factor']} is not supported (needs 1/255)")
        mean = tuple(float(x) for x in config.get("image_mean", OPENAI_CLIP_MEAN))
        std = tuple(float(x) for x in config.get("image_std", OPENAI_CLIP_STD))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"{path}: image_mean and image_std need 3 values each")
        return cls(image_size=int(size), mean=mean, std=std)

    def save_pretrained(self, folder: str | os.PathLike, processor_class: str = "BlipProcessor") -> None:
        """Write preprocessor_config.json as transformers writes it for BlipImageProcessor (`processor_class`:
        "Blip2Processor" in a BLIP-2 folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "image_processor_type": "BlipImageProcessor",
            "processor_class": processor_class,
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"height": self.image_size, "width": self.image_size},
            "resample": BICUBIC,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }
        (folder / PREPROCESSOR_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _nested_image_processor(path: Path) -> dict | None:
    """processor_config.json's "image_processor" settings, or None (no file, or the older flat file holding only
    e.g. num_query_tokens)."""
    if not path.is_file():
        return None
    nested = _read_json(path).get("image_processor")
    if nested is not None and not isinstance(nested, dict):
        raise ValueError(f"{path}: image_processor is not a JSON object")
    return nested


# ---------------------------------------------------------------------------------------------------------------------
# Training augmentation

Rng = random.Random | torch.Generator | None


class _Draws:
    """Uniform floats and integers from a random.Random, a torch.Generator, or (None) Python's global generator."""

    def __init__(self, rng: Rng):
        self.rng = random if rng is None else rng

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        if isinstance(self.rng, torch.Generator):
            u = torch.rand((), generator=self.rng, dtype=torch.float64).item()
        else:
            u = self.rng.random()
        return low + (high - low) * u

    def randint(self, low: int, high: int) -> int:
        """low..high inclusive."""
        if isinstance(self.rng, torch.Generator):
            return int(torch.randint(low, high + 1, (), generator=self.rng).item())
        return self.rng.randint(low, high)


RANDAUGMENT_OPS = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
MAX_LEVEL = 10  # RandAugment magnitudes are on a 0..10 scale
FILL = (128, 128, 128)


@dataclass(frozen=True)
class TrainTransform:
    """BLIP's training augmentation: RandomResizedCrop(scale, ratio 3/4..4/3, bicubic) -> horizontal flip (p=0.5) ->
    RandAugment(N=2, M=5) over RANDAUGMENT_OPS, each sampled op applied with p=0.5, fill grey (128,128,128) -> /255 ->
    normalise. Magnitudes follow the original code at M=5: shear 0.15, translate 5 pixels, rotate 15 degrees (each
    with a random sign), enhancement factor (M/10)*1.8+0.1 = 1.0 (so Brightness and Sharpness leave the image as is).
    Pass a random.Random or torch.Generator to make it reproducible."""

    image_size: int = 384
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    randaugment: bool = True
    num_ops: int = 2
    magnitude: int = 5
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __call__(self, images: Image.Image | Sequence[Image.Image], rng: Rng = None) -> torch.Tensor:
        """Augmented, normalised float32 [B, 3, S, S]."""
        if isinstance(images, Image.Image):
            images = [images]
        draws = _Draws(rng)
        augmented = [self.augment(im, draws) for im in images]
        if not augmented:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return _to_tensor(augmented, self.mean, self.std)

    def augment(self, image: Image.Image, rng: Rng | _Draws = None) -> Image.Image:
        """One image -> augmented 8-bit RGB PIL image of size S x S."""
        draws = rng if isinstance(rng, _Draws) else _Draws(rng)
        image = to_rgb(image)
        top, left, height, width = self._crop_box(image.width, image.height, draws)
        image = image.crop((left, top, left + width, top + height))
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        if self.hflip and draws.uniform() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment:
            ops = [RANDAUGMENT_OPS[draws.randint(0, len(RANDAUGMENT_OPS) - 1)] for _ in range(self.num_ops)]
            for op in ops:
                if draws.uniform() > 0.5:
                    continue
                image = self._apply(op, image, draws)
        return image

    def _crop_box(self, width: int, height: int, draws: _Draws) -> tuple[int, int, int, int]:
        """RandomResizedCrop's box (top, left, height, width): up to 10 tries at a random area fraction in `scale` and a
        log-uniform aspect ratio in `ratio`; if none fits, the largest centred box whose ratio is within `ratio`."""
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * draws.uniform(*self.scale)
            aspect = math.exp(draws.uniform(log_low, log_high))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return draws.randint(0, height - h), draws.randint(0, width - w), h, w
        actual = width / height
        if actual < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif actual > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _apply(self, op: str, image: Image.Image, draws: _Draws) -> Image.Image:
        level = self.magnitude / MAX_LEVEL
        bilinear = Image.Resampling.BILINEAR

        def affine(a: float, b: float, c: float, d: float, e: float, f: float) -> Image.Image:
            # PIL maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f)
            return image.transform(image.size, Image.Transform.AFFINE, (a, b, c, d, e, f), bilinear, fillcolor=FILL)

        if op == "Identity":
            return image
        if op == "AutoContrast":
            return ImageOps.autocontrast(image)
        if op == "Equalize":
            return ImageOps.equalize(image)
        if op in ("Brightness", "Sharpness"):
            enhancer = ImageEnhance.Brightness if op == "Brightness" else ImageEnhance.Sharpness
            return enhancer(image).enhance(level * 1.8 + 0.1)
        sign = -1.0 if draws.uniform() > 0.5 else 1.0
        if op == "ShearX":
            return affine(1, -sign * level * 0.3, 0, 0, 1, 0)
        if op == "ShearY":
            return affine(1, 0, 0, -sign * level * 0.3, 1, 0)
        if op == "TranslateX":
            return affine(1, 0, sign * level * 10, 0, 1, 0)
        if op == "TranslateY":
            return affine(1, 0, 0, 0, 1, sign * level * 10)
        if op == "Rotate":
            return image.rotate(sign * level * 30, resample=bilinear, fillcolor=FILL)
        raise ValueError(f"unknown RandAugment op {op!r}")
