"""Data: every manifest format, bad rows skipped and counted (never a crash), the global batch sampler, tar shards."""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from blip.data.manifests import DataError, SkipLog, read_caption_rows, read_pairs, read_questions, resolve_sources
from blip.data.vocab import shapes_tokenizer
from blip.train.collate import PairCollator, QuestionCollator, pre_caption
from blip.train.datasets import GlobalBatchSampler, PairDataset, TarPairStream, count_tar_samples
from blip.transforms import load_image


def _image_fn(image, rng):
    return torch.tensor([float(image.getpixel((0, 0))[0]), rng.random()])


@pytest.fixture
def mixed(tmp_path):
    """A folder with two good images, one corrupt file and references to a missing one."""
    for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (8, 8), color).save(tmp_path / name)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


def test_jsonl_manifest_skips_bad_rows(mixed):
    lines = [
        json.dumps({"image": "a.png", "caption": "a red square"}),
        "{not json",
        json.dumps({"image": "missing.png", "caption": "gone"}),
        json.dumps({"image": "b.png", "caption": "   "}),
        json.dumps({"image": "b.png", "captions": ["a blue square", "blue"]}),
        json.dumps({"caption": "no image"}),
    ]
    (mixed / "m.jsonl").write_text("\n".join(lines) + "\n")
    skips = SkipLog()
    pairs = read_pairs([str(mixed / "m.jsonl")], skips=skips)
    assert [(p.text, p.image_id) for p in pairs] == [("a red square", 0), ("a blue square", 1), ("blue", 1)]
    assert skips.summary() == {"bad json": 1, "missing image file": 1, "empty text": 1, "no image column": 1}


def test_csv_with_custom_columns(mixed):
    with (mixed / "m.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "alt_text"])
        writer.writerows([["a.png", "red"], ["missing.png", "x"], ["b.png", ""]])
    skips = SkipLog()
    pairs = read_pairs([str(mixed / "m.csv")], image_column="path", text_column="alt_text", skips=skips)
    assert [p.text for p in pairs] == ["red"]
    assert skips.total == 2


def test_karpathy_and_coco_caption_files(shapes_dir):
    train = read_caption_rows(str(shapes_dir / "dataset_shapes.json"))
    test = read_caption_rows(str(shapes_dir / "dataset_shapes.json"), split="test")
    assert len(train) == 48 and len(test) == 12 and all(len(r["captions"]) == 5 for r in train + test)
    coco = read_caption_rows(str(shapes_dir / "captions_test_coco.json"))
    assert [r["captions"] for r in coco] == [r["captions"] for r in test]
    jsonl = read_caption_rows(str(shapes_dir / "test.jsonl"))
    assert [r["captions"] for r in jsonl] == [r["captions"] for r in test]


def test_vqa_manifest_and_vqav2_pair_agree(shapes_dir):
    rows = read_questions(str(shapes_dir / "vqa_test.jsonl"))
    pair = read_questions(str(shapes_dir / "vqa_test_questions.json"))
    assert len(rows) == len(pair) == 60
    assert [(q.image, q.question, q.answers) for q in rows] == [(q.image, q.question, q.answers) for q in pair]
    answers, weights = rows[0].answer_weights()
    assert sum(weights) == pytest.approx(1.0) and len(answers) == len(set(answers))
    assert weights[answers.index(rows[0].answers[0])] == rows[0].answers.count(rows[0].answers[0]) / 10


def test_folder_sources_per_task(shapes_dir):
    assert resolve_sources(str(shapes_dir), "pretrain")[0].endswith("web.jsonl")
    assert resolve_sources(str(shapes_dir), "caption")[0].endswith("clean.jsonl")
    assert resolve_sources(str(shapes_dir), "vqa")[0].endswith("vqa.jsonl")
    assert resolve_sources(str(shapes_dir), "vqa", purpose="eval")[0].endswith("vqa_test.jsonl")
    assert len(resolve_sources(str(shapes_dir / "web-*.tar"), "pretrain")) == 2
    with pytest.raises(DataError, match="not found"):
        resolve_sources(str(shapes_dir / "nope.jsonl"), "caption")


def test_undecodable_images_are_replaced_and_counted(mixed):
    pairs = read_pairs_from(mixed, [("a.png", "one"), ("corrupt.png", "two"), ("b.png", "three")])
    dataset = PairDataset(pairs, _image_fn, seed=0)
    items = [dataset[(0, i)] for i in range(3)]
    assert [item["text"] for item in items] == ["one", "three", "three"]
    assert dataset.skips.summary() == {"undecodable image": 1}


def read_pairs_from(folder, rows):
    (folder / "m.jsonl").write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows))
    return read_pairs([str(folder / "m.jsonl")])


def test_augmentation_rng_depends_only_on_seed_epoch_and_index(mixed):
    pairs = read_pairs_from(mixed, [("a.png", "one"), ("b.png", "two")])
    dataset = PairDataset(pairs, _image_fn, seed=5)
    assert torch.equal(dataset[(3, 1)]["pixel_values"], dataset[(3, 1)]["pixel_values"])
    assert not torch.equal(dataset[(3, 1)]["pixel_values"], dataset[(4, 1)]["pixel_values"])


def test_cached_pixels_are_the_decoded_ones_and_each_image_is_decoded_once(mixed, monkeypatch):
    import blip.train.datasets as datasets

    decoded = {"plain": [], "cached": []}
    pairs = read_pairs_from(mixed, [("a.png", "one"), ("corrupt.png", "two"), ("b.png", "three"), ("a.png", "four")])
    plain = PairDataset(pairs, _pixels_fn, seed=3)
    cached = PairDataset(pairs, _pixels_fn, seed=3, cache_bytes=10**6)
    items = {}
    for name, dataset in (("plain", plain), ("cached", cached)):
        monkeypatch.setattr(
            datasets, "load_image", lambda path, log=decoded[name]: log.append(Path(path).name) or load_image(path)
        )
        items[name] = [dataset[(epoch, i)] for epoch in range(3) for i in range(4)]
    for a, b in zip(items["plain"], items["cached"], strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["text"] == b["text"]
    assert decoded["plain"].count("a.png") == 6 and decoded["cached"].count("a.png") == 1  # two rows, three epochs
    assert decoded["plain"].count("corrupt.png") == decoded["cached"].count("corrupt.png") == 1
    # the corrupt row's stand-in (the next row) is not cached under the corrupt row's name
    assert sorted(Path(k).name for k in cached._cache) == ["a.png", "b.png"]

    one_image = PairDataset(pairs, _pixels_fn, seed=3, cache_bytes=_pixels_fn(None, None).nbytes)
    for i in range(4):
        one_image[(0, i)]
    assert len(one_image._cache) == 1 and one_image._cache_left == 0


def _pixels_fn(image, rng):
    """Deterministic pixels (no augmentation): what the cache is for."""
    return torch.full((3, 4, 4), float(image.getpixel((0, 0))[2]) if image is not None else 0.0)


def test_the_image_cache_is_used_only_where_pixels_repeat():
    from blip.train.config import ConfigError, TrainConfig
    from blip.train.recipe import _cache_bytes

    assert _cache_bytes(TrainConfig(augment=False, image_cache_mb=2)) == 2 * 2**20
    assert _cache_bytes(TrainConfig(augment=True, image_cache_mb=2)) == 0
    assert _cache_bytes(TrainConfig(augment=False, num_workers=2, image_cache_mb=2)) == 0
    with pytest.raises(ConfigError, match="image_cache_mb must be >= 0, got -1"):
        TrainConfig(image_cache_mb=-1)


def test_global_batch_sampler_splits_the_same_global_batch_over_ranks():
    one = GlobalBatchSampler(50, 8, seed=3)
    two = [GlobalBatchSampler(50, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(2)
    batches_one = list(one)
    batches_two = [list(s) for s in two]
    assert len(batches_one) == 6 == len(batches_two[0])  # 50 // 8, the last incomplete batch dropped
    for b, (r0, r1) in enumerate(zip(*batches_two)):
        assert r0 + r1 == batches_one[b]
    one.set_epoch(2, start=4)  # resume after 4 batches
    assert list(one) == batches_one[4:]
    one.set_epoch(3)
    assert list(one) != batches_one


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_tar_shards_stream_skip_bad_samples_and_resume(tmp_path):
    samples = []
    for i in range(10):
        samples += [(f"s{i:03d}.png", _png((i * 20, 0, 0))), (f"s{i:03d}.txt", f"caption {i}".encode())]
    samples += [("bad.png", b"garbage"), ("bad.txt", b"broken image"), ("notext.png", _png((0, 0, 0)))]
    samples += [("empty.png", _png((0, 0, 0))), ("empty.txt", b"   ")]
    _tar(tmp_path / "a.tar", samples[:14])
    _tar(tmp_path / "b.tar", samples[14:])
    shards = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert sum(count_tar_samples(shards)) == 13
    stream = TarPairStream(shards, _image_fn, batch_size=2, seed=0)
    stream.set_position(epoch=0)
    first = [item["text"] for item, _ in zip(stream, range(12))]
    assert len(set(first)) == 10 and all(t.startswith("caption") for t in first[:10])
    assert set(stream.skips.summary()) == {"undecodable image", "empty text"}
    resumed = TarPairStream(shards, _image_fn, batch_size=2, seed=0)
    resumed.set_position(epoch=0, skip_batches=2)
    assert [item["text"] for item, _ in zip(resumed, range(8))] == first[4:12]
    _tar(tmp_path / "good.tar", samples[:20])  # ten good samples: each of two ranks streams five of them
    rank0, rank1 = (
        TarPairStream([str(tmp_path / "good.tar")], _image_fn, batch_size=2, rank=r, world_size=2) for r in (0, 1)
    )
    texts0 = [i["text"] for i, _ in zip(rank0, range(5))]
    texts1 = [i["text"] for i, _ in zip(rank1, range(5))]
    assert not set(texts0) & set(texts1) and len(set(texts0 + texts1)) == 10


def test_a_negatives_column_reaches_the_batch_as_written_itm_negatives(mixed):
    lines = [
        json.dumps({"image": "a.png", "captions": ["a red square", "red"], "negatives": ["a blue square", " "]}),
        json.dumps({"image": "b.png", "caption": "a blue square"}),
    ]
    (mixed / "m.jsonl").write_text("\n".join(lines) + "\n")
    pairs = read_pairs([str(mixed / "m.jsonl")])
    assert [p.negatives for p in pairs] == [("a blue square",), ("a blue square",), ()]
    dataset = PairDataset(pairs, _image_fn, seed=0)
    items = [dataset[(0, i)] for i in range(3)]
    assert [item.get("negatives") for item in items] == [["a blue square"], ["a blue square"], None]
    assert [item["pixel_values"].tolist() for item in items] == [  # drawing a negative leaves augmentation alone
        _image_fn(Image.new("RGB", (1, 1), c), random.Random(f"blip.train/0/0/{i}")).tolist()
        for i, c in enumerate([(255, 0, 0), (255, 0, 0), (0, 0, 255)])
    ]
    tokenizer = shapes_tokenizer()
    batch = PairCollator(tokenizer, max_length=30)(items[1:])  # of these two rows only the first has a negative
    assert batch["negative_owner"].tolist() == [0]
    assert tokenizer.decode(batch["negative_ids"][0]) == "a blue square"
    assert "negative_ids" not in PairCollator(tokenizer, max_length=30)(items[2:])
    # several per sample: distinct texts of the row's own, each owned by its row in the batch
    (mixed / "k.jsonl").write_text(
        json.dumps({"image": "b.png", "caption": "a blue square", "negatives": ["a red star", "a blue star", "a red"]})
        + "\n"
        + json.dumps({"image": "a.png", "caption": "a red square", "negatives": ["a blue square"]})
        + "\n"
    )
    rows = read_pairs([str(mixed / "k.jsonl")])
    two = [PairDataset(rows, _image_fn, seed=0, negatives=2)[(0, i)] for i in range(2)]
    assert len(two[0]["negatives"]) == 2 and set(two[0]["negatives"]) < {"a red star", "a blue star", "a red"}
    assert two[1]["negatives"] == ["a blue square"]  # fewer written than asked: all of them
    batch = PairCollator(tokenizer, max_length=30)(two)
    assert batch["negative_owner"].tolist() == [0, 0, 1]
    assert [tokenizer.decode(i) for i in batch["negative_ids"]] == [*two[0]["negatives"], "a blue square"]
    assert "negatives" not in PairDataset(rows, _image_fn, seed=0, negatives=0)[(0, 0)]


def test_collators():
    tokenizer = shapes_tokenizer()
    items = [
        {"pixel_values": torch.zeros(3, 4, 4), "text": "A red circle.", "image_id": 3},
        {"pixel_values": torch.ones(3, 4, 4), "text": "two shapes: a star", "image_id": 5},
    ]
    batch = PairCollator(tokenizer, max_length=30, prompt="a picture of ")(items)
    assert tokenizer.decode(batch["input_ids"][0]) == "a picture of a red circle"
    assert batch["image_ids"].tolist() == [3, 5] and batch["pixel_values"].shape == (2, 3, 4, 4)
    assert pre_caption("Two shapes: a star!") == "two shapes a star"
    vqa = QuestionCollator(tokenizer)(
        [
            {
                "pixel_values": torch.zeros(3, 4, 4),
                "question": "what color is the star?",
                "answers": ["red", "pink"],
                "weights": [0.8, 0.2],
            },
            {
                "pixel_values": torch.zeros(3, 4, 4),
                "question": "is there a star?",
                "answers": ["yes"],
                "weights": [1.0],
            },
        ]
    )
    assert vqa["answer_owner"].tolist() == [0, 0, 1] and vqa["answer_weights"].tolist() == pytest.approx([0.8, 0.2, 1])
    assert tokenizer.decode(vqa["input_ids"][0]) == "what color is the star?"
    assert [tokenizer.decode(a) for a in vqa["answer_ids"]] == ["red", "pink", "yes"]


def test_shuffled_order_is_a_permutation():
    sampler = GlobalBatchSampler(32, 4, seed=random.Random(0).randint(0, 100))
    seen = [i for batch in sampler for _, i in batch]
    assert sorted(seen) == list(range(32))


def test_tar_samples_with_duplicate_member_names_are_skipped_and_counted(tmp_path):
    """Issue 14.12: a repeated member name used to replace the earlier copy silently."""
    members = [("a.png", _png((255, 0, 0))), ("a.txt", b"first a"), ("a.png", _png((0, 0, 255))), ("a.txt", b"a2")]
    members += [("b.png", _png((0, 255, 0))), ("b.txt", b"only b")]
    _tar(tmp_path / "d.tar", members)
    assert count_tar_samples([str(tmp_path / "d.tar")]) == [1]
    stream = TarPairStream([str(tmp_path / "d.tar")], _image_fn, batch_size=1, seed=0)
    assert [item["text"] for item, _ in zip(stream, range(3))] == ["only b"] * 3
    assert set(stream.skips.summary()) == {"duplicate member name"}
    assert "a (a.png, a.txt)" in stream.skips.examples["duplicate member name"]
