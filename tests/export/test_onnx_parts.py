"""Each exported graph, run by ONNX Runtime, against the PyTorch model it came from (fp32: within 1e-4), on shapes
other than the ones traced (other batch sizes, text lengths, rows per image, past lengths); `onnx.checker` on every
file; the manifest; fp16 exports close to fp32."""

from __future__ import annotations

import json

import pytest
import torch

from blip.models.bert import KVCache

onnx = pytest.importorskip("onnx")  # the [onnx] extra; CI installs it (`make test` installs .[dev,all])
ort = pytest.importorskip("onnxruntime")

TOL = dict(atol=1e-4, rtol=1e-4)


def _session(folder, part):
    manifest = json.loads((folder / "manifest.json").read_text())
    return ort.InferenceSession(str(folder / manifest["parts"][part]["file"]), providers=["CPUExecutionProvider"])


def _run(folder, part, **feeds):
    feeds = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feeds.items()}
    return [torch.from_numpy(o) for o in _session(folder, part).run(None, feeds)]


def _texts(model, rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random word-piece ids `[rows, length]` with [CLS] first, right padding of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.text.vocab_size - 2, (rows, length), generator=g)
    ids[:, 0] = model.tokenizer.cls_token_id
    mask = torch.ones(rows, length, dtype=torch.long)
    for r in range(rows):
        keep = length - (r % 3)
        mask[r, keep:] = 0
        ids[r, keep:] = model.tokenizer.pad_token_id
    return ids, mask


def _pixels(batch: int, model, seed: int) -> torch.Tensor:
    size = model.config.vision.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["caption", "vqa", "retrieval"])
def test_files_pass_the_checker_and_the_manifest_describes_them(kind, onnx_exports, export_models):
    folder = onnx_exports(kind)
    manifest = json.loads((folder / "manifest.json").read_text())
    expected = {
        "caption": ["vision", "cross_kv", "decoder"],
        "vqa": ["vision", "question", "cross_kv", "decoder"],
        "retrieval": ["vision", "text", "itm"],
    }[kind]
    assert list(manifest["parts"]) == expected
    assert manifest["kind"] == kind and manifest["dtype"] == "float32"
    for info in manifest["parts"].values():
        path = folder / info["file"]
        onnx.checker.check_model(str(path), full_check=True)
        graph = onnx.load(str(path)).graph
        assert [i["name"] for i in info["inputs"]] == [i.name for i in graph.input]
        assert [o["name"] for o in info["outputs"]] == [o.name for o in graph.output]
    assert sorted(manifest["tokenizer"]["files"]) == sorted(
        ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]
    )
    cfg = export_models(kind).config
    vision = manifest["parts"]["vision"]
    assert vision["inputs"][0]["shape"] == ["batch", 3, cfg.vision.image_size, cfg.vision.image_size]
    assert vision["outputs"][0]["shape"] == ["batch", cfg.vision.num_positions, cfg.vision.hidden_size]
    if "decoder" in manifest["parts"]:
        decoder = manifest["parts"]["decoder"]
        names = [i["name"] for i in decoder["inputs"]]
        layers = cfg.text.num_hidden_layers
        assert names[:2] == ["input_ids", "cross_mask"] and len(names) == 2 + 4 * layers
        heads, width = cfg.text.num_attention_heads, cfg.text.hidden_size // cfg.text.num_attention_heads
        assert decoder["inputs"][2]["shape"] == ["batch", heads, "past", width]
        assert decoder["outputs"][0]["shape"] == ["batch", cfg.text.vocab_size]


@pytest.mark.parametrize("kind", ["caption", "vqa", "retrieval"])
def test_vision_matches_pytorch(kind, onnx_exports, export_models):
    m = export_models(kind)
    pixels = _pixels(3, m, seed=1)
    outs = _run(onnx_exports(kind), "vision", pixel_values=pixels)
    with torch.no_grad():
        embeds = m.model.encode_image(pixels)
        torch.testing.assert_close(outs[0], embeds, **TOL)
        if kind == "retrieval":
            torch.testing.assert_close(outs[1], m.model.image_features(embeds), **TOL)
        else:
            assert len(outs) == 1


def test_itc_text_and_itm_match_pytorch(onnx_exports, export_models):
    m = export_models("retrieval")
    folder = onnx_exports("retrieval")
    ids, mask = _texts(m, rows=6, length=7, seed=2)
    (features,) = _run(folder, "text", input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        expected = m.model.text_features(m.model.encode_text(ids, mask))
        torch.testing.assert_close(features, expected, **TOL)
        embeds = m.model.encode_image(_pixels(2, m, seed=3))
        for images in (embeds, embeds.repeat_interleave(3, dim=0)):  # 3 rows per image, then one image per row
            (logits,) = _run(folder, "itm", image_embeds=images, input_ids=ids, attention_mask=mask)
            cross = m.model.image_cross_kv(images)
            expected = m.model.itm_logits(m.model.encode_multimodal(ids, mask, cross=cross))
            torch.testing.assert_close(logits, expected, **TOL)
    assert not torch.allclose(logits[0], logits[3])  # different images give different scores


def test_vqa_question_encoder_matches_pytorch(onnx_exports, export_models):
    m = export_models("vqa")
    ids, mask = _texts(m, rows=4, length=6, seed=4)
    with torch.no_grad():
        embeds = m.model.encode_image(_pixels(2, m, seed=5))
        (states,) = _run(onnx_exports("vqa"), "question", image_embeds=embeds, input_ids=ids, attention_mask=mask)
        expected = m.model.encode_multimodal(ids, mask, cross=m.model.image_cross_kv(embeds))
    torch.testing.assert_close(states, expected, **TOL)


@pytest.mark.parametrize("kind", ["caption", "vqa"])
def test_decoder_steps_over_a_kv_cache_match_pytorch(kind, onnx_exports, export_models):
    """Prefix (past 0, 4 tokens), then one token per step over the growing cache, then two tokens at once over a
    non-empty cache: logits and the present keys/values equal PyTorch's decoder with its own KVCache."""
    m = export_models(kind)
    folder = onnx_exports(kind)
    decoder = m.model.text_decoder
    layers, heads = len(decoder.bert.layers), m.config.text.num_attention_heads
    head_dim = m.config.text.hidden_size // heads
    sources, per_source = 2, 3
    with torch.no_grad():
        if kind == "vqa":  # question states with padding: the cross mask matters
            embeds = m.model.encode_image(_pixels(sources, m, seed=6))
            q_ids, q_mask = _texts(m, rows=sources, length=5, seed=7)
            q_mask[0, 3:] = 0
            states = m.model.encode_multimodal(q_ids, q_mask, cross=m.model.image_cross_kv(embeds))
            cross_mask = q_mask
        else:
            states = m.model.encode_image(_pixels(sources, m, seed=6))
            cross_mask = torch.ones(states.shape[:2], dtype=torch.long)
        cross = decoder.bert.cross_kv(states, cross_mask)
        onnx_cross = _run(folder, "cross_kv", encoder_states=states)
        for i in range(layers):
            torch.testing.assert_close(onnx_cross[2 * i], cross.keys[i], **TOL)
            torch.testing.assert_close(onnx_cross[2 * i + 1], cross.values[i], **TOL)

        rows = sources * per_source
        g = torch.Generator().manual_seed(8)
        tokens = torch.randint(5, m.config.text.vocab_size - 2, (rows, 8), generator=g)
        tokens[:, 0] = m.config.text.bos_token_id
        cache = KVCache(layers, 16)
        past = [torch.zeros(rows, heads, 0, head_dim)] * (2 * layers)
        names = [f"past_{k}_{i}" for i in range(layers) for k in ("key", "value")]
        cross_names = [f"cross_{k}_{i}" for i in range(layers) for k in ("key", "value")]
        for start, stop in ((0, 4), (4, 5), (5, 6)):
            feeds = dict(zip(names, past), **dict(zip(cross_names, onnx_cross)))
            logits, *past = _run(folder, "decoder", input_ids=tokens[:, start:stop], cross_mask=cross_mask, **feeds)
            expected = decoder(tokens[:, start:stop], cross=cross, cache=cache, last_only=True)
            torch.testing.assert_close(logits, expected, **TOL)
            assert past[0].shape == (rows, heads, stop, head_dim)
            torch.testing.assert_close(past[0], cache.keys[0][:, :, :stop], **TOL)
            torch.testing.assert_close(past[-1], cache.values[-1][:, :, :stop], **TOL)
        # two tokens at once over the 6 cached ones == the whole 8-token sequence from scratch
        feeds = dict(zip(names, past), **dict(zip(cross_names, onnx_cross)))
        logits, *_ = _run(folder, "decoder", input_ids=tokens[:, 6:8], cross_mask=cross_mask, **feeds)
        torch.testing.assert_close(logits, decoder(tokens, cross=cross, last_only=True), **TOL)
    assert not torch.allclose(logits[0], logits[per_source])  # rows of different sources see different sources


def test_fp16_export_runs_and_is_close_to_fp32(onnx_exports, export_models):
    m = export_models("caption")
    folder = onnx_exports("caption", "float16")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == "float16"
    for info in manifest["parts"].values():
        onnx.checker.check_model(str(folder / info["file"]))
    pixels = _pixels(2, m, seed=9)
    (embeds,) = _run(folder, "vision", pixel_values=pixels)  # pixels stay float32 in an fp16 export
    assert embeds.dtype == torch.float16
    with torch.no_grad():
        expected = m.model.encode_image(pixels)
        torch.testing.assert_close(embeds.float(), expected, atol=3e-2, rtol=3e-2)
        cross = _run(folder, "cross_kv", encoder_states=embeds)
        layers = len(m.model.text_decoder.bert.layers)
        heads = m.config.text.num_attention_heads
        past = [torch.zeros(2, heads, 0, m.config.text.hidden_size // heads, dtype=torch.float16)] * (2 * layers)
        names = [f"past_{k}_{i}" for i in range(layers) for k in ("key", "value")]
        cross_names = [f"cross_{k}_{i}" for i in range(layers) for k in ("key", "value")]
        ids = torch.tensor([[m.config.text.bos_token_id, 10, 11]] * 2)
        feeds = dict(zip(names, past), **dict(zip(cross_names, cross)))
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        logits, *_ = _run(folder, "decoder", input_ids=ids, cross_mask=mask, **feeds)
        reference = m.model.text_decoder(ids, cross=m.model.text_decoder.bert.cross_kv(expected), last_only=True)
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), reference, atol=5e-2, rtol=5e-2)
