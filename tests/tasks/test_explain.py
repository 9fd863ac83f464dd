"""ITM Grad-CAM (`Blip.explain`): the maps against transformers' own attention probabilities and autograd, their
relations (per word pieces -> words -> whole text), the unchanged normal path, the errors and the rendering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import blip
from blip.models.bert import AttentionProbe
from blip.tasks.common import MAX_TEXT_TOKENS
from blip.tasks.explain import overlay, words_of, write_explanation
from oracle import TinySpec, hf_load, make_images

# 3 text layers (so layer 0, 1, 2 and the default 1 all exist); a 48 px image in 8 px patches: a 6 x 6 grid.
RETRIEVAL = TinySpec(kind="retrieval", seed=93, text_layers=3, image_size=48)
TEXT = "a red circle on the left of two blue squares"


@pytest.fixture(scope="module")
def retrieval_dir(hf_checkpoints):
    return hf_checkpoints(RETRIEVAL)


@pytest.fixture(scope="module")
def matcher(retrieval_dir) -> blip.Blip:
    return blip.load(retrieval_dir)


@pytest.fixture(scope="module")
def hf_retrieval(retrieval_dir):
    return hf_load(retrieval_dir, "retrieval")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return make_images(1, seed=5)[0]


def _oracle_maps(hf_retrieval, image, text, layer):
    """Grad-CAM from transformers: its cross-attention probabilities (output_attentions) and autograd of its ITM
    match logit; per token mean over heads of A * relu(dA), image [CLS] dropped, [CLS]/[SEP] rows dropped."""
    model, processor = hf_retrieval
    inputs = processor(images=image, text=text, return_tensors="pt")
    image_embeds = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    out = model.text_encoder(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        encoder_hidden_states=image_embeds,
        output_attentions=True,
    )
    logits = model.itm_head(out.last_hidden_state[:, 0])
    attention = out.cross_attentions[layer]  # (1, H, T, N)
    (grad,) = torch.autograd.grad(logits[0, 1], attention)
    cams = (attention * grad.clamp(min=0))[0, :, 1:-1, 1:].mean(0).detach()
    grid = int((cams.shape[-1]) ** 0.5)
    return cams.reshape(-1, grid, grid).numpy(), float(logits.detach().softmax(-1)[0, 1])


@pytest.mark.parametrize("layer", [0, 1])
def test_token_maps_equal_transformers_attention_times_gradient(hf_retrieval, matcher, image, layer):
    expected, expected_score = _oracle_maps(hf_retrieval, image, TEXT, layer)
    got = matcher.explain(image, TEXT, layer=layer)
    assert got.layer == layer
    assert got.token_maps.shape == expected.shape == (len(got.tokens), 6, 6)
    assert expected.max() > 0  # the comparison is not between two zero arrays
    np.testing.assert_allclose(got.token_maps, expected, atol=1e-6, rtol=1e-4)
    assert got.score == pytest.approx(expected_score, abs=1e-5)


def test_maps_shape_sign_and_relations(matcher, image):
    got = matcher.explain(image, TEXT)
    assert got.layer == 1  # the middle of 3 layers (LAVIS: 6 of 12)
    assert got.words == TEXT.split()
    assert got.word_maps.shape == (len(got.words), 6, 6) and got.text_map.shape == (6, 6)
    for maps in (got.word_maps, got.text_map, got.token_maps):
        assert maps.dtype == np.float32 and np.isfinite(maps).all() and (maps >= 0).all()
    assert got.text_map.max() > 0
    np.testing.assert_allclose(got.word_maps.sum(0), got.text_map, rtol=1e-5, atol=1e-7)
    for word_map, pieces in zip(got.word_maps, got.word_tokens):
        np.testing.assert_allclose(word_map, got.token_maps[pieces].sum(0), rtol=1e-6, atol=1e-8)


def test_word_pieces_merge_into_the_words_as_written(matcher, image):
    text = "Two dogs playing on the beach."  # "play ##ing" -> "playing"; "beach ." -> "beach."
    got = matcher.explain(image, text)
    assert got.words == ["Two", "dogs", "playing", "on", "the", "beach."]
    assert got.tokens == ["two", "dogs", "play", "##ing", "on", "the", "beach", "."]
    assert got.word_tokens == [[0], [1], [2, 3], [4], [5], [6, 7]]
    np.testing.assert_allclose(got.word_maps[2], got.token_maps[2] + got.token_maps[3], rtol=1e-6)


def test_words_of_groups_by_whitespace():
    text = "  a  dog's\tball "
    offsets = [(2, 3), (5, 8), (8, 9), (9, 10), (11, 15)]
    assert words_of(text, offsets) == (["a", "dog's", "ball"], [[0], [1, 2, 3], [4]])


def test_maps_change_with_the_text_and_the_layer(matcher, image):
    a = matcher.explain(image, "a red circle")
    b = matcher.explain(image, "two blue squares on the left")
    c = matcher.explain(image, "a red circle", layer=0)
    assert not np.allclose(a.text_map, b.text_map)
    assert not np.allclose(a.text_map, c.text_map)
    assert a.score != b.score


def test_score_equals_match_and_the_normal_path_is_untouched(matcher, image):
    before = matcher.match(image, [TEXT, "a dog"])
    got = matcher.explain(image, TEXT)
    assert got.score == pytest.approx(before[0], abs=1e-6)
    assert matcher.match(image, [TEXT, "a dog"]) == before  # no state left behind
    assert all(p.grad is None for p in matcher.model.parameters())  # no parameter gradient formed


def test_probe_changes_nothing_in_the_states(matcher, image):
    """The explicitly formed attention at the probed layer gives the encoder states of the fused path."""
    model = matcher.model
    ids, mask = matcher.tokenizer([TEXT])
    with torch.no_grad():
        embeds = model.encode_image(matcher.transform([image]))
        plain = model.encode_multimodal(ids, mask, embeds)
        cross = model.image_cross_kv(embeds)
        cross.probe = AttentionProbe(1)
        probed = model.encode_multimodal(ids, mask, cross=cross)
    torch.testing.assert_close(probed, plain, atol=1e-5, rtol=1e-5)
    assert cross.probe.probs.shape == (1, 4, ids.shape[1], 37)
    torch.testing.assert_close(cross.probe.probs.sum(-1), torch.ones(1, 4, ids.shape[1]))


def test_errors_are_one_line(matcher, captioner, image):
    cases = [
        (lambda: captioner.explain(image, "a dog"), "no head for 'itm'"),
        (lambda: matcher.explain(image, "a dog", layer=3), "layer 3 is out of range"),
        (lambda: matcher.explain(image, "a dog", layer=2), "reads \\[CLS\\] only"),
        (lambda: matcher.explain(image, "a dog", layer=-1), "out of range"),
        (lambda: matcher.explain(image, "a dog", layer="2"), "must be an integer"),
        (lambda: matcher.explain(image, " ".join(["dog"] * MAX_TEXT_TOKENS)), f"at most {MAX_TEXT_TOKENS}"),
        (lambda: matcher.explain(image, "  "), "empty"),
        (lambda: matcher.explain([image, image], "a dog"), "one image and one text"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert len(matcher.explain(image, " ".join(["dog"] * (MAX_TEXT_TOKENS - 2))).words) == MAX_TEXT_TOKENS - 2


def test_overlay_and_written_files(matcher, image, tmp_path):
    got = matcher.explain(image, "Two dogs playing")
    hot = np.zeros((6, 6), np.float32)
    hot[0, 5] = 1.0  # top right
    picture = overlay(image, hot, size=120)
    assert max(picture.size) == 120
    pixels = np.asarray(picture, dtype=np.float32)
    plain = np.asarray(image.convert("RGB").resize(picture.size, Image.Resampling.BICUBIC), dtype=np.float32)
    change = np.abs(pixels - plain).sum(-1)
    h, w = change.shape
    assert change[: h // 6, -w // 6 :].mean() > 10 * change[-h // 2 :, : w // 2].mean()  # the heat sits top right

    page = write_explanation(image, got, tmp_path / "maps")
    html = page.read_text()
    names = ["text.png", "word00_two.png", "word01_dogs.png", "word02_playing.png", "sheet.png"]
    for name in names:
        with Image.open(tmp_path / "maps" / name) as png:
            png.load()
            assert png.mode == "RGB"
        assert name == "sheet.png" or f'src="{name}"' in html
    assert "playing" in html and f"{got.score:.4f}" in html


def test_cli_writes_the_maps_and_the_page(retrieval_dir, caption_dir, image, tmp_path, capsys):
    import json

    from blip.cli import main

    path = tmp_path / "a.png"
    image.save(path)
    out = tmp_path / "maps"
    argv = ["explain", "--model", str(retrieval_dir), "--image", str(path), "--text", "two dogs", "--out", str(out)]
    assert main([*argv, "--layer", "0", "--format", "jsonl"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["words"] == ["two", "dogs"] and row["layer"] == 0 and 0 < row["score"] < 1
    html = (out / "index.html").read_text()
    for name in ("text.png", "word00_two.png", "word01_dogs.png"):
        assert f'src="{name}"' in html
        with Image.open(out / name) as png:
            assert png.size == (384, 171)  # the image's own aspect, longest side 384
    assert main([*argv, "--layer", "2"]) == 2
    assert "layer 2 is out of range" in capsys.readouterr().err
    argv[2] = str(caption_dir)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no head for 'itm'" in err


def test_blip2_refuses_with_the_reason(tmp_path, image):
    from oracle_blip2 import Blip2Spec, build_blip2_checkpoint

    model = blip.load(build_blip2_checkpoint(tmp_path / "b2", Blip2Spec(kind="retrieval", seed=13)))
    assert "itm" in model.tasks
    with pytest.raises(ValueError, match="only the Q-Former's query tokens attend to the image") as info:
        model.explain(image, "a dog")
    assert "\n" not in str(info.value)
