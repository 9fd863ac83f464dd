"""Image decoding and preprocessing against transformers' BlipImageProcessor (PIL backend) and convert_to_rgb."""

from __future__ import annotations

import io
import json
import random
import re
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import blip.transforms
from blip.tokenizer import BlipTokenizer
from blip.transforms import (
    DEFAULT_MAX_PIXELS,
    OPENAI_CLIP_MEAN,
    RANDAUGMENT_OPS,
    ImageDecodeError,
    ImageTransform,
    TrainTransform,
    load_image,
    to_rgb,
)

transformers = pytest.importorskip("transformers")
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb  # noqa: E402


def hf_processor(**kwargs):
    # BlipImageProcessor needs torchvision; without it transformers falls back to this PIL class anyway.
    return transformers.BlipImageProcessorPil(**kwargs)


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 1-bit grey pixels but carries an empty IDAT: decoding would fail or take
    width*height bytes, so refusing it must happen on the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ---- evaluation preprocessing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [384, 48])
def test_matches_transformers_processor(size):
    shapes = [(640, 480), (37, 100), (size, size), (300, 1000), (1, 1), (size + 1, size - 1)]
    images = [random_rgb(w, h, seed=i) for i, (w, h) in enumerate(shapes)]
    ours = ImageTransform(image_size=size)(images)
    ref = hf_processor(size={"height": size, "width": size})(images=images, return_tensors="pt")["pixel_values"]
    assert ours.dtype == torch.float32 and ours.shape == (len(images), 3, size, size)
    assert (ours - ref).abs().max().item() < 1e-6
    assert torch.equal(ours, ref)  # in fact bit-identical


def test_non_rgb_inputs_are_converted_like_transformers():
    images = [im for im in mode_zoo().values()]
    ours = ImageTransform(image_size=24)(images)
    ref = hf_processor(size={"height": 24, "width": 24})(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(ours, ref)


def mode_zoo() -> dict[str, Image.Image]:
    rng = np.random.RandomState(1)
    rgba = Image.fromarray(rng.randint(0, 256, (9, 13, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.randint(0, 256, (9, 13), dtype=np.uint8), "L")
    palette_key = rgba.convert("RGB").quantize(16)
    palette_key.info["transparency"] = 3  # one palette index is fully transparent
    palette_alpha = rgba.quantize(16)  # RGBA quantised: per-entry alpha in the palette
    palette_alpha = Image.open(io.BytesIO(png_bytes(palette_alpha)))
    rgb_key = rgba.convert("RGB")
    rgb_key.info["transparency"] = tuple(int(v) for v in np.asarray(rgb_key)[0, 0])
    return {
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "PA": rgba.convert("PA"),
        "P+key": palette_key,
        "P+alpha": palette_alpha,
        "P": rgba.convert("RGB").quantize(16),
        "RGB+key": rgb_key,
        "L": grey,
        "1": grey.convert("1"),
        "CMYK": rgba.convert("RGB").convert("CMYK"),
        "YCbCr": rgba.convert("RGB").convert("YCbCr"),
        "I;16": Image.fromarray((rng.randint(0, 1024, (9, 13))).astype(np.uint16)),
        "I": Image.fromarray(rng.randint(-10, 400, (9, 13)).astype(np.int32)),
        "F": Image.fromarray(rng.uniform(-5, 300, (9, 13)).astype(np.float32)),
    }


@pytest.mark.parametrize("mode", list(mode_zoo()))
def test_to_rgb_matches_transformers_convert(mode):
    image = mode_zoo()[mode]
    ours = to_rgb(image)
    assert ours.mode == "RGB" and ours.size == image.size
    assert np.array_equal(np.asarray(ours), hf_convert_to_rgb(image, return_numpy=True))
    assert np.array_equal(np.asarray(load_image(image)), np.asarray(ours))


@pytest.mark.parametrize("mode", list(mode_zoo()))
def test_resizing_while_converting_equals_convert_then_resize(mode, monkeypatch):
    """`size=` (used by the server and batch jobs right after decoding) gives the pixels the model's preprocessing
    gives, bit for bit, though it resizes grey images in one band and composites transparency in strips."""
    monkeypatch.setattr(blip.transforms, "STRIP_PIXELS", 20)  # strips of one or two rows here
    image = mode_zoo()[mode]
    for size in (5, 9, 13, 24):
        expected = np.asarray(to_rgb(image).resize((size, size), Image.Resampling.BICUBIC))
        ours = to_rgb(image, size=size)
        assert ours.mode == "RGB" and np.array_equal(np.asarray(ours), expected), size
        assert np.array_equal(np.asarray(load_image(image, size=size)), expected)
    if mode in ("RGBA", "LA", "P+alpha", "P", "L", "1", "RGB+key"):
        data = png_bytes(image)
        full = load_image(data)
        assert np.array_equal(np.asarray(full), hf_convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True))
        for size in (5, 24):
            expected = np.asarray(full.resize((size, size), Image.Resampling.BICUBIC))
            assert np.array_equal(np.asarray(load_image(data, size=size)), expected)


PEAK_SCRIPT = """
import io, sys
from PIL import Image
from blip.transforms import load_image

def kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

mode, side = sys.argv[1], int(sys.argv[2])
colour = {"RGBA": (200, 10, 10, 100), "LA": (90, 100), "L": 90}[mode]
buffer = io.BytesIO()
Image.new(mode, (side, side), colour).save(buffer, "PNG")
data = buffer.getvalue()
start = kib("VmRSS")
image = load_image(data, size=int(sys.argv[3]) if len(sys.argv) > 3 else None)
print((kib("VmHWM") - start) / 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_decoding_peaks_near_one_decoded_copy():
    """A 3000x3000 image decodes to 34 MiB (4 bytes a pixel); composited onto white the old way it took four such
    copies (the RGBA, white, the composite, the RGB). Now: the decoded image, the result and strips of a MiB at most; a
    grey image resized on load never exists as RGB."""
    decoded = 3000 * 3000 * 4 / 2**20

    def peak(*args: str) -> float:
        run = subprocess.run([sys.executable, "-c", textwrap.dedent(PEAK_SCRIPT), *map(str, args)], capture_output=True)
        assert run.returncode == 0, run.stderr.decode()[-2000:]
        return float(run.stdout.decode().split()[-1])

    assert peak("RGBA", 3000) < 3 * decoded
    assert peak("LA", 3000, 384) < 1.6 * decoded
    assert peak("L", 3000, 384) < 0.5 * decoded


def test_transparency_goes_to_white_after_decoding():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    for image in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba, "RGBA").convert("LA")):
        out = np.asarray(load_image(png_bytes(image), name="bytes[0]"))
        assert (out[2:] == 255).all() and (out[:2] != 255).any()


def test_rgb_image_is_returned_as_is():
    image = random_rgb(5, 7)
    assert load_image(image) is image


def test_exif_orientation_applied_for_bytes_and_paths_not_for_pil(tmp_path):
    image = random_rgb(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    data = buffer.getvalue()
    (tmp_path / "rotated.jpg").write_bytes(data)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    for source in (data, tmp_path / "rotated.jpg", str(tmp_path / "rotated.jpg")):
        loaded = load_image(source)
        assert loaded.size == (20, 40) and np.array_equal(np.asarray(loaded), expected)
    assert load_image(Image.open(io.BytesIO(data))).size == (40, 20)


def test_broken_inputs_raise_image_decode_error(tmp_path):
    png = png_bytes(random_rgb(64, 64))
    buffer = io.BytesIO()
    random_rgb(64, 64).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    cases = {
        "bytes[0]": b"",
        "bytes[1]": b"this is just some text, not an image\n" * 4,
        "bytes[2]": png[: len(png) // 2],
        "bytes[3]": jpeg[: len(jpeg) // 2],
        "bytes[4]": png[:30],
        "bytes[5]": png[:16] + b"\x00" * 20 + png[36:],  # corrupt IHDR
    }
    for name, data in cases.items():
        with pytest.raises(ImageDecodeError, match="^" + re.escape(name) + ": ") as info:
            load_image(data, name=name)
        assert isinstance(info.value, ValueError)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(png[:-40])
    (tmp_path / "notes.txt").write_text("hello")
    for path, reason in [
        ("empty.png", "empty"),
        ("cut.png", "truncated|corrupt"),
        ("notes.txt", "not an image"),
        ("missing.png", "cannot read"),
        (".", "directory"),
    ]:
        with pytest.raises(ImageDecodeError, match=reason) as info:
            load_image(tmp_path / path)
        assert str(tmp_path / path) in str(info.value)
    with pytest.raises(ImageDecodeError, match="^image 3: "):
        load_image(b"GIF89a broken", name="image 3")
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


def test_huge_images_refused_before_decoding():
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="bytes"):
        load_image(png_header_only(20000, 20000))  # 400 MP: over Pillow's own bomb limit too
    with pytest.raises(ImageDecodeError, match=r"9000x9000 = 81000000 pixels.*max_pixels.*before decoding"):
        load_image(png_header_only(9000, 9000))  # 81 MP: under Pillow's limit, over ours
    with pytest.raises(ImageDecodeError, match=r"3000x2000 .* over the limit of 1000000"):
        load_image(png_header_only(3000, 2000), max_pixels=1_000_000, name="big.png")
    with pytest.raises(ImageDecodeError, match="too large"):  # Pillow's warning zone (89-179 MP) becomes an error
        load_image(png_header_only(10000, 10000), max_pixels=10**9)
    assert time.perf_counter() - start < 1.0
    assert 8000 * 8000 <= DEFAULT_MAX_PIXELS < Image.MAX_IMAGE_PIXELS
    assert load_image(png_bytes(random_rgb(100, 100)), max_pixels=10_000).size == (100, 100)


# ---- preprocessor_config.json --------------------------------------------------------------------------------------


def test_preprocessor_config_round_trip_through_transformers(tmp_path):
    ours = ImageTransform(image_size=40, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
    assert type(hf).__name__.startswith("BlipImageProcessor")
    assert (hf.size["height"], hf.size["width"]) == (40, 40) and hf.resample == 3
    assert list(hf.image_mean) == [0.5, 0.4, 0.3] and list(hf.image_std) == [0.2, 0.25, 0.3]
    assert hf.do_resize and hf.do_rescale and hf.do_normalize and hf.do_convert_rgb
    assert ImageTransform.from_pretrained(tmp_path) == ours
    images = [random_rgb(50, 30, seed=3), mode_zoo()["RGBA"]]
    assert torch.equal(ours(images), hf(images=images, return_tensors="pt")["pixel_values"])

    saved_by_hf = tmp_path / "hf"
    hf_processor(size={"height": 64, "width": 64}).save_pretrained(str(saved_by_hf))
    assert ImageTransform.from_pretrained(saved_by_hf) == ImageTransform(image_size=64)


def test_preprocessor_config_variants(tmp_path):
    assert ImageTransform.from_pretrained(tmp_path) == ImageTransform()  # no file: defaults
    config = tmp_path / "preprocessor_config.json"
    config.write_text(json.dumps({"size": 224, "image_mean": OPENAI_CLIP_MEAN}))
    assert ImageTransform.from_pretrained(tmp_path) == ImageTransform(image_size=224)
    assert ImageTransform.from_pretrained(config) == ImageTransform(image_size=224)
    for bad in (
        {"size": {"height": 224, "width": 300}},
        {"size": {"shortest_edge": 224}},
        {"resample": 2},
        {"do_normalize": False},
        {"rescale_factor": 1.0},
        {"do_center_crop": True},
    ):
        config.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="preprocessor_config.json"):
            ImageTransform.from_pretrained(tmp_path)
    config.write_text("{")
    with pytest.raises(ValueError, match="cannot read"):
        ImageTransform.from_pretrained(tmp_path)


def test_full_folder_loads_in_auto_processor(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "on", "the", "beach", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BlipTokenizer.from_pretrained(tmp_path)
    transform = ImageTransform(image_size=32)
    folder = tmp_path / "saved"
    tokenizer.save_pretrained(folder)
    transform.save_pretrained(folder)
    processor = transformers.AutoProcessor.from_pretrained(str(folder))
    assert type(processor).__name__ == "BlipProcessor"
    images = [random_rgb(40, 30), random_rgb(20, 60, seed=1)]
    texts = ["a dog on the beach.", "the dog"]
    out = processor(images=images, text=texts, padding=True, return_tensors="pt")
    ids, mask = tokenizer(texts)
    assert torch.equal(out["pixel_values"], transform(images))
    assert torch.equal(out["input_ids"], ids) and torch.equal(out["attention_mask"], mask)


# ---- training augmentation -----------------------------------------------------------------------------------------


def test_train_transform_is_reproducible_and_random():
    images = [random_rgb(80, 60, seed=i) for i in range(4)]
    transform = TrainTransform(image_size=32)
    a = transform(images, rng=random.Random(7))
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, transform(images, rng=random.Random(7)))
    assert not torch.equal(a, transform(images, rng=random.Random(8)))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(transform(images, rng=g1), transform(images, rng=g2))


def test_train_transform_without_randomness_equals_eval_transform():
    images = [random_rgb(50, 50, seed=i) for i in range(2)]
    plain = TrainTransform(image_size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, randaugment=False)
    assert torch.equal(plain(images, rng=random.Random(0)), ImageTransform(image_size=24)(images))


def test_train_crop_box_is_inside_the_image():
    transform = TrainTransform(image_size=16, scale=(0.5, 1.0))
    rng = random.Random(0)
    from blip.transforms import _Draws

    draws = _Draws(rng)
    for width, height in [(100, 50), (50, 100), (10, 400), (400, 10), (33, 33)]:
        for _ in range(50):
            top, left, h, w = transform._crop_box(width, height, draws)
            assert 0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= height and left + w <= width


@pytest.mark.parametrize("op", RANDAUGMENT_OPS)
def test_randaugment_ops(op):
    from blip.transforms import _Draws

    image = Image.fromarray(np.random.RandomState(5).randint(60, 160, (32, 32, 3), dtype=np.uint8))  # low contrast
    out = TrainTransform(image_size=32)._apply(op, image, _Draws(random.Random(0)))
    assert out.mode == "RGB" and out.size == (32, 32)
    same = np.array_equal(np.asarray(out), np.asarray(image))
    # At magnitude 5 the original's enhancement factor is exactly 1.0: Brightness and Sharpness change nothing.
    assert same == (op in ("Identity", "Brightness", "Sharpness"))
    if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        corners = np.asarray(out)[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == 128).all(axis=1).any()  # grey fill shows up somewhere at the border
