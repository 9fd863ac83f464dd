"""`blip.export.onnx_runtime.OnnxBlip` against the PyTorch `Blip` it was exported from: the same token ids for greedy
and beam captions and answers, the same scores; its torch-free preprocessing and tokenizer against blip's; it runs in
a process where torch cannot be imported; one-line errors (unsupported part, format, dtype, missing packages); the
`blip export` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip.export import ExportError, export
from blip.tasks.options import OptionError

pytest.importorskip("onnx")  # the [onnx] extra; CI installs it (`make test` installs .[dev,all])
pytest.importorskip("onnxruntime")

from blip.export.onnx_runtime import OnnxBlip  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
QUESTIONS = ["what colour is the circle?", "how many shapes are there", "is there a star on the left of the square?"]


def _same(ours, theirs):
    assert [a.token_ids for a in ours] == [b.token_ids for b in theirs]
    assert [a.text for a in ours] == [b.text for b in theirs]
    np.testing.assert_allclose([a.score for a in ours], [b.score for b in theirs], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(num_beams=3),
        dict(num_beams=4, num_captions=2, length_penalty=0.5, max_new_tokens=12),
        dict(prompt="a picture of", repetition_penalty=1.5, min_new_tokens=4, max_new_tokens=15),
        dict(num_beams=2, repetition_penalty=1.3, min_new_tokens=2),
    ],
    ids=["greedy", "beam3", "beam4-two-captions", "prompt-penalties", "beam-penalties"],
)
def test_captions_equal_pytorch_token_for_token(settings, onnx_exports, export_models, images):
    m = export_models("caption")
    runner = OnnxBlip(onnx_exports("caption"), batch_size=3)  # several chunks; sources leave mid-batch
    ours, theirs = runner.caption(images, **settings), m.caption(images, **settings)
    if settings.get("num_captions", 1) > 1:
        ours, theirs = [c for per in ours for c in per], [c for per in theirs for c in per]
    _same(ours, theirs)
    lengths = {len(c.token_ids) for c in theirs}
    assert len(lengths) > 1 and max(lengths) > 4, "the oracle model should give captions of several lengths"


@pytest.mark.parametrize("num_beams", [1, 3])
def test_answers_equal_pytorch_token_for_token(num_beams, onnx_exports, export_models, images):
    m = export_models("vqa")
    runner = OnnxBlip(onnx_exports("vqa"))
    # one image, several questions (encoded once, rows grouped) and pairwise lists (one image row per question)
    for imgs, questions in ((images[0], QUESTIONS), (images[:3], QUESTIONS)):
        theirs = m.answer(imgs, questions, num_beams=num_beams)
        _same(runner.answer(imgs, questions, num_beams=num_beams), theirs)
    assert max(len(a.token_ids) for a in theirs) > 2, "the oracle model should give answers longer than [DEC] [SEP]"


def test_match_and_similarity_equal_pytorch(onnx_exports, export_models, images):
    m = export_models("retrieval")
    runner = OnnxBlip(onnx_exports("retrieval"))
    np.testing.assert_allclose(runner.match(images[0], QUESTIONS), m.match(images[0], QUESTIONS), atol=1e-5)
    np.testing.assert_allclose(runner.match(images[:3], QUESTIONS), m.match(images[:3], QUESTIONS), atol=1e-5)
    np.testing.assert_allclose(runner.similarity(images, QUESTIONS), m.similarity(images, QUESTIONS), atol=1e-5)


def test_fp16_runner_captions(onnx_exports, images):
    runner = OnnxBlip(onnx_exports("caption", "float16"))
    captions = runner.caption(images, num_beams=2, max_new_tokens=8)
    assert len(captions) == len(images)
    assert all(c.token_ids[0] == runner.text["bos_token_id"] and np.isfinite(c.score) for c in captions)


def test_preprocessing_and_tokenizer_equal_blips(onnx_exports, export_models, images, tmp_path):
    from blip.export import onnx_runtime
    from blip.tokenizer import CLEANUP_RULES

    m = export_models("caption")
    runner = OnnxBlip(onnx_exports("caption"))
    palette = images[0].convert("P")
    palette.info["transparency"] = 3
    grey_alpha = images[3].convert("LA")
    path = tmp_path / "x.png"
    images[4].save(path)
    inputs = [*images, palette, grey_alpha, images[1].convert("1"), images[2].convert("CMYK")]
    ours = onnx_runtime.pixel_values(inputs, runner.image_size, runner.mean, runner.std)
    np.testing.assert_array_equal(ours, m.transform(inputs).numpy())
    np.testing.assert_array_equal(
        onnx_runtime.pixel_values([onnx_runtime.load_image(path)], runner.image_size, runner.mean, runner.std),
        m.transform([Image.open(path)]).numpy(),
    )

    texts = ["A Dog, on the beach!", "  two   RED circles ?", "[SEP] the [MASK] sky", " ".join(["dog"] * 50)]
    for text in texts:
        assert runner.tokenizer.encode(text) == m.tokenizer.encode(text)
        assert runner.tokenizer.encode(text, 35) == m.tokenizer.encode(text, max_length=35)
    ids, mask = m.tokenizer(texts, max_length=35)
    ours_ids, ours_mask = runner.tokenizer.batch(texts, 35, m.tokenizer.pad_token_id)
    np.testing.assert_array_equal(ours_ids, ids.numpy())
    np.testing.assert_array_equal(ours_mask, mask.numpy())
    weird = [m.config.text.bos_token_id, 7, 8, 10**6, m.tokenizer.sep_token_id, -1, 9]
    assert runner.tokenizer.decode(weird) == m.tokenizer.decode(weird)
    assert onnx_runtime.CLEANUP_RULES == CLEANUP_RULES


def test_runner_works_where_torch_cannot_be_imported(onnx_exports, export_models, images, tmp_path):
    for i, image in enumerate(images[:2]):
        image.save(tmp_path / f"{i}.png")
    script = f"""
import json, sys
sys.modules["torch"] = None  # any `import torch` now fails
from blip.export.onnx_runtime import OnnxBlip
m = OnnxBlip({str(onnx_exports("caption"))!r})
caps = m.caption([{str(tmp_path / "0.png")!r}, {str(tmp_path / "1.png")!r}], num_beams=2)
print(json.dumps([c.token_ids for c in caps]))
assert not any(name == "torch" or name.startswith("torch.") for name, mod in sys.modules.items() if mod is not None)
"""
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = export_models("caption").caption([tmp_path / "0.png", tmp_path / "1.png"], num_beams=2)
    assert json.loads(done.stdout) == [c.token_ids for c in expected]


# --- errors ----------------------------------------------------------------------------------------------------------


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_export_errors_are_one_line(export_models, tmp_path, monkeypatch):
    retrieval, caption = export_models("retrieval"), export_models("caption")
    with pytest.raises(ExportError) as e:
        export(retrieval, tmp_path / "a", parts=["decoder"])
    assert "'decoder' is not supported for a 'retrieval' checkpoint" in _one_line(e)
    with pytest.raises(ExportError) as e:
        export(caption, tmp_path / "b", parts=["vision", "text"])
    assert "'text'" in _one_line(e) and "vision, cross_kv, decoder" in str(e.value)
    with pytest.raises(ExportError) as e:
        export(caption, tmp_path / "c", parts=["encoder"])
    assert "unknown part 'encoder'" in _one_line(e)
    with pytest.raises(ExportError) as e:
        export(caption, tmp_path / "d", format="tflite")
    assert "unsupported export format 'tflite'" in _one_line(e)
    with pytest.raises(ExportError) as e:
        export(caption, tmp_path / "e", dtype="bfloat16")
    assert "unsupported export dtype 'bfloat16'" in _one_line(e)
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the extra were not installed
    with pytest.raises(ExportError) as e:
        export(caption, tmp_path / "f")
    assert "pip install 'blip-vl[onnx]'" in _one_line(e)
    assert not (tmp_path / "f").exists()


def test_runner_errors_are_one_line(onnx_exports, images, tmp_path, monkeypatch):
    retrieval = OnnxBlip(onnx_exports("retrieval"))
    with pytest.raises(ExportError) as e:
        retrieval.caption(images[0])
    assert "has no 'decoder' part" in _one_line(e)
    captioner = OnnxBlip(onnx_exports("caption"))
    with pytest.raises(OptionError) as e:
        captioner.caption(images[0], do_sample=True)
    assert _one_line(e).startswith("do_sample:")
    with pytest.raises(OptionError) as e:
        captioner.caption(images[0], max_new_tokens=100)
    assert _one_line(e).startswith("max_new_tokens:") and "64 text positions" in str(e.value)
    with pytest.raises(OptionError):
        captioner.caption(images[0], num_beams=0)  # the options' own checks, as Blip.caption has them
    with pytest.raises(OptionError) as e:
        OnnxBlip(onnx_exports("vqa")).answer(images[0], "what?", answers=["yes", "no"])
    assert _one_line(e).startswith("answers:")
    with pytest.raises(ExportError) as e:
        OnnxBlip(tmp_path)
    assert "manifest" in _one_line(e)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError) as e:
        OnnxBlip(onnx_exports("caption"))
    assert "pip install 'blip-vl[onnx]'" in _one_line(e)


def test_cli_export(hf_checkpoints, tmp_path, capsys):
    from blip.cli import main

    from .conftest import SPECS

    folder = hf_checkpoints(SPECS["caption"])
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(folder), "--out", str(out), "--parts", "vision", "cross_kv"]) == 0
    assert "vision, cross_kv (float32)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["parts"]) == ["vision", "cross_kv"] and (out / "vision.onnx").is_file()
    assert not (out / "decoder.onnx").exists()
    for argv, message in (
        (["--format", "coreml"], "unsupported export format 'coreml'"),
        (["--parts", "itm"], "part 'itm' is not supported for a 'caption' checkpoint"),
        (["--dtype", "int8"], "unsupported export dtype 'int8'"),
    ):
        assert main(["export", "--model", str(folder), "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("blip export: error:") and message in err and "\n" not in err


def test_pretrain_checkpoint_exports_every_part(tmp_path, images):
    """A pretrain model (all heads; what the shapes world trains) gets all five parts, and the runner's captions and
    ITM scores equal the PyTorch model's."""
    import blip
    from blip.config import get_preset
    from blip.data.vocab import config_for, shapes_tokenizer

    tokenizer = shapes_tokenizer()
    m = blip.create_model(config_for(tokenizer, get_preset("blip_test")), tokenizer, seed=3)
    for p in m.model.parameters():  # create_model's init is nearly flat: spread it so ids and scores differ
        p.data.add_(torch.randn_like(p) * 0.05)
    manifest = export(m, tmp_path / "onnx")
    assert list(manifest["parts"]) == ["vision", "text", "itm", "cross_kv", "decoder"]
    runner = OnnxBlip(tmp_path / "onnx")
    _same(runner.caption(images, num_beams=2, max_new_tokens=8), m.caption(images, num_beams=2, max_new_tokens=8))
    texts = ["a red circle", "two blue squares on the left"]
    np.testing.assert_allclose(runner.match(images[0], texts), m.match(images[0], texts), atol=1e-5)
    np.testing.assert_allclose(runner.similarity(images, texts), m.similarity(images, texts), atol=1e-5)
