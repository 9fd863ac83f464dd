"""The BLIP-2 benchmark's row functions (benchmarks/blip2_vs_transformers.py) on a tiny checkpoint on the CPU: the
same code the CPU and GPU rows time, here only for its outputs-equal checks (no speed is asserted). Covers the
shard-by-shard bf16 checkpoint builder, transformers running on our very tensors (`share`) or loading the folder
itself (the GPU rows' way), the decode-step and peak-memory helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import blip2_vs_transformers as bench  # noqa: E402

from oracle import make_images  # noqa: E402

TINY = dict(
    vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=48, image_size=28, qformer_hidden=32,
    qformer_layers=2, qformer_heads=4, qformer_ffn=40, num_query_tokens=4, lm_hidden=32, lm_layers=2, lm_heads=4,
    lm_ffn=48, lm_vocab=512,
)  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return {
        dtype: bench.build_checkpoint(root / dtype, bench.spec_for(None, **TINY), getattr(torch, dtype), 40_000)
        for dtype in ("float32", "bfloat16")
    }


def test_checkpoint_is_sharded_in_its_dtype_and_reused(folders):
    folder = folders["bfloat16"]
    from safetensors import safe_open

    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    with safe_open(shards[0], "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    stamp = shards[0].stat().st_mtime_ns
    assert bench.build_checkpoint(folder, bench.spec_for(None, **TINY)) == folder
    assert shards[0].stat().st_mtime_ns == stamp  # built once, then reused


@pytest.mark.parametrize("dtype, share", [("float32", False), ("float32", True), ("bfloat16", True)])
def test_rows_outputs_equal_transformers(folders, dtype, share):
    """In bf16 a tiny model's logits tie often (1 ulp at 8 is 1/32); with these weights (lm_vocab 512) and images no
    tie decides a token here, while other draws (lm_vocab 600, or make_images(3, seed=1)'s second image) meet an exact
    tie in transformers' bf16 logits, which its argmax breaks by index and ours, one ulp apart, does not."""
    ours, hf, processor = bench.load_both(folders[dtype], dtype=dtype, share=share)
    if share:  # one copy of the weights: transformers runs on our tensors
        assert hf.language_model.lm_head.weight.data_ptr() == ours.model.language_model.lm_head.weight.data_ptr()
    row = bench.six_questions(ours, hf, processor, bench.make_image(), new_tokens=4, repeats=1)
    assert row["outputs_agree"], row
    row = bench.captions(ours, hf, processor, make_images(3, seed=4), new_tokens=5, repeats=1)
    assert row["outputs_agree"], row


def test_decode_step_and_memory_helpers(folders):
    ours, _, _ = bench.load_both(folders["bfloat16"], share=True)
    lm = ours.model.language_model
    table = lm.model.decoder.embed_tokens.weight
    layers = sum(p.numel() * 2 for p in lm.model.decoder.layers.parameters())
    assert bench.lm_read_bytes(ours) == layers + table.numel() * 2 + 2 * 32 * 2  # + tied head + final norm
    measured = bench.decode_step(ours, bench.make_image(), steps=3, repeats=1)
    assert measured["step_s"] > 0 and measured["bandwidth"] > 0 and measured["ratio"] > 0
    rss = bench.peak_rss_child(folders["bfloat16"], threads=1)
    assert rss["peak_mib"] >= rss["loaded_mib"] > 0 and rss["param_mib"] > 0
