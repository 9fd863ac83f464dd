"""The shapes-world NLVR2 analogue: true labels, balance, the closed vocabulary, determinism, the files, and the
pair-swap augmentation keeping labels true."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from blip.data.nlvr import read_nlvr_pairs
from blip.data.shapes.nlvr import TEMPLATES, Claim, generate_nlvr, make_nlvr_example
from blip.data.shapes.scene import Scene, Shape
from blip.data.vocab import shapes_vocab_tokens
from blip.train.nlvr import NlvrCollator, NlvrDataset, swap_left_right, swap_pair

EXAMPLES = [make_nlvr_example("train", i, seed=3) for i in range(600)]


def test_labels_are_true_to_the_scenes_and_balanced_within_every_template():
    assert all(ex.claim.holds(ex.left, ex.right) == ex.label for ex in EXAMPLES)
    counts = Counter((ex.claim.template, ex.label) for ex in EXAMPLES)
    for template in TEMPLATES:
        true, false = counts[(template, True)], counts[(template, False)]
        assert 0.35 < true / (true + false) < 0.65, (template, true, false)
    assert 0.45 < sum(ex.label for ex in EXAMPLES) / len(EXAMPLES) < 0.55


def test_statements_use_only_the_shapes_vocabulary_and_need_both_images():
    vocab = set(shapes_vocab_tokens())
    assert {w for ex in EXAMPLES for w in ex.statement.split()} <= vocab
    # a claim about one image is not decided by that image alone across the data: the same left image goes with
    # both labels of "both"/"only" claims depending on the right image
    left = Scene("white", (Shape("star", "red", "small", "top"),))
    with_star = Scene("black", (Shape("star", "blue", "large", "left"),))
    without = Scene("black", (Shape("circle", "blue", "large", "left"),))
    both = Claim("both", kind="star")
    assert both.holds(left, with_star) and not both.holds(left, without)
    only = Claim("only", side="left", color="red")
    assert only.text() == "a red shape is in the left picture and no red shape is in the right picture"
    assert only.holds(left, without) and not only.holds(left, Scene("gray", (Shape("star", "red", "small", "top"),)))
    assert Claim("count", side="right", count=1).text() == "there is one shape in the right picture"
    assert Claim("has", side="left", kind="circle", color="orange").text() == "an orange circle is in the left picture"


def test_examples_are_a_pure_function_of_seed_split_index():
    assert make_nlvr_example("train", 17, seed=3) == EXAMPLES[17]
    assert make_nlvr_example("train", 17, seed=4) != EXAMPLES[17]
    assert make_nlvr_example("test", 17, seed=3) != EXAMPLES[17]


def test_swapping_the_images_swaps_left_and_right_and_keeps_every_label():
    for ex in EXAMPLES:
        swapped = ex.claim.swapped()
        if ex.claim.side is None:  # "... in the left picture and in the right picture": the same either way round
            assert swapped == ex.claim
            assert swap_left_right(ex.statement).endswith("in the right picture and in the left picture")
        else:
            assert swapped.text() == swap_left_right(ex.statement)
        assert swapped.holds(ex.right, ex.left) == ex.label
    assert swap_left_right("Left of the right, leftover") == "Right of the left, leftover"
    draws = [swap_pair("a", "b", "the left one", random.Random(i)) for i in range(200)]
    assert set(draws) == {("a", "b", "the left one"), ("b", "a", "the right one")}
    assert 60 < sum(d[0] == "b" for d in draws) < 140


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("nlvr_world")
    meta = generate_nlvr(out, seed=3, n_train=24, n_test=6)
    return out, meta


def test_generated_files(world):
    out, meta = world
    assert meta["complete"] and meta["counts"]["train"]["pairs"] == 24
    rows = [json.loads(line) for line in (out / "nlvr_train.jsonl").read_text().splitlines()]
    assert rows[5] == make_nlvr_example("train", 5, seed=3).row()
    assert all((out / r["image_a"]).is_file() and (out / r["image_b"]).is_file() for r in rows)
    original = json.loads((out / "nlvr_train.json").read_text())
    assert original[5]["images"] == [rows[5]["image_a"], rows[5]["image_b"]]
    assert original[5]["label"] in ("True", "False") and original[5]["sentence"] == rows[5]["statement"]
    ours, theirs = read_nlvr_pairs(out / "nlvr_train.jsonl"), read_nlvr_pairs(out / "nlvr_train.json")
    assert [(p.image_a, p.image_b, p.statement, p.label) for p in ours] == [
        (p.image_a, p.image_b, p.statement, p.label) for p in theirs
    ]
    assert ours[0].template == rows[0]["template"]


def test_the_dataset_swaps_pixels_and_words_together(world):
    out, _ = world
    from blip.data.vocab import shapes_tokenizer
    from blip.transforms import ImageTransform

    transform = ImageTransform(32)
    pairs = read_nlvr_pairs(out / "nlvr_train.jsonl")
    plain = NlvrDataset(pairs, lambda image, rng: transform([image])[0], seed=1, swap=False)
    swapping = NlvrDataset(pairs, lambda image, rng: transform([image])[0], seed=1, swap=True)
    seen = Counter()
    for epoch in range(3):
        for i in range(len(pairs)):
            a, b = plain[(epoch, i)], swapping[(epoch, i)]
            assert a["label"] == b["label"] == int(pairs[i].label)
            if torch.equal(b["pixels_a"], a["pixels_a"]):
                assert b["statement"] == a["statement"]
                seen["kept"] += 1
            else:
                assert torch.equal(b["pixels_a"], a["pixels_b"]) and torch.equal(b["pixels_b"], a["pixels_a"])
                assert b["statement"] == swap_left_right(a["statement"])
                seen["swapped"] += 1
    assert seen["kept"] > 10 and seen["swapped"] > 10
    tokenizer = shapes_tokenizer()
    batch = NlvrCollator(tokenizer, enc_token_id=tokenizer.vocab_size + 1)([plain[0], plain[1]])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][2], plain[0]["pixels_b"])  # lefts first, then rights
    assert (batch["input_ids"][:, 0] == tokenizer.vocab_size + 1).all()
    assert batch["labels"].tolist() == [int(pairs[0].label), int(pairs[1].label)]


def test_swap_left_right_takes_leftmost_and_keeps_all_capitals():
    # "leftmost"/"rightmost" name a side as "left"/"right" do (the original's substring swap turns them too);
    # other words that merely contain the letters stay; an all-capitals word stays all capitals
    assert swap_left_right("the leftmost dog, the Rightmost cat") == "the rightmost dog, the Leftmost cat"
    assert swap_left_right("LEFT image, RIGHT-hand") == "RIGHT image, LEFT-hand"
    assert swap_left_right("bright, upright, leftover, lefty") == "bright, upright, leftover, lefty"


def test_evaluating_no_pairs_is_a_clear_error(tmp_path):
    from blip.data.manifests import DataError
    from blip.evaluation.nlvr import evaluate_nlvr

    with pytest.raises(DataError, match="no NLVR pairs to evaluate"):
        evaluate_nlvr(None, [])  # type: ignore[arg-type]


def test_regenerating_with_another_seed_redraws_the_images(tmp_path):
    # images already there are kept only when they were drawn with the same seed and settings: otherwise the new
    # statements would be about the old pictures (labels wrong)
    import numpy as np
    from PIL import Image

    from blip.data.shapes.drawing import render
    from blip.data.shapes.scene import ShapesConfig

    generate_nlvr(tmp_path, seed=0, n_train=3, n_test=1)
    generate_nlvr(tmp_path, seed=1, n_train=3, n_test=1)
    for i in range(3):
        ex = make_nlvr_example("train", i, seed=1)
        for scene, rel in zip((ex.left, ex.right), ex.images):
            on_disk = np.asarray(Image.open(tmp_path / rel).convert("RGB"))
            assert np.array_equal(on_disk, np.asarray(render(scene, ShapesConfig()).convert("RGB"))), rel
