"""`blip demo` / `make demo`: the command line end to end on the shapes world with tiny models.

Until the CapFilt pipeline lands this runs every inference path a user takes — a dataset on disk, checkpoints in
the Hugging Face layout, `blip caption|vqa|match|similarity|convert` — on freshly initialised tiny models, so the
words they print are random: the plumbing is what is shown, not learning.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
from pathlib import Path

from blip.config import TextConfig, get_preset


def _vocab_file(folder: Path) -> Path:
    from blip.data.shapes import vocabulary

    words = sorted({w for phrase in vocabulary() for w in phrase.lower().split()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "?", ".", ","]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    return path


def _tiny_config(kind: str, vocab_size: int):
    base = get_preset("blip_test")
    text = TextConfig(
        **{
            **base.text.__dict__,
            "vocab_size": vocab_size + 2,
            "bos_token_id": vocab_size,
            "sep_token_id": 3,
            "pad_token_id": 0,
        }
    )
    return base.replace(kind=kind, text=text)


def _run(argv: list[str]) -> tuple[int, str]:
    from blip.cli import main

    print(f"$ blip {shlex.join(argv)}")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    out = buffer.getvalue()
    print(out.rstrip() or "(no output)")
    print(f"(exit {code})\n")
    return code, out


def run_demo(out: Path) -> int:
    import blip
    from blip.data import shapes

    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    print(f"generating a small shapes-world dataset in {data} ...")
    shapes.generate(data, seed=0, n_clean=8, n_web=8, n_vqa=8, n_test=8, progress=False)
    test_rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()][:4]
    images = [str(data / row["image"]) for row in test_rows]

    models = out / "models"
    models.mkdir(exist_ok=True)
    vocab = _vocab_file(models)
    vocab_size = len(vocab.read_text().split())
    for kind in ("caption", "vqa", "retrieval"):
        model = blip.create_model(_tiny_config(kind, vocab_size), vocab, seed=0)
        model.save(models / kind)
    print(f"saved untrained tiny caption/vqa/retrieval models (Hugging Face layout) under {models}\n")

    failures = 0
    failures += _run(["caption", "--model", str(models / "caption"), *images, "--num-beams", "3", "--format", "jsonl"])[
        0
    ]
    failures += _run(
        [
            "vqa",
            "--model",
            str(models / "vqa"),
            "--image",
            images[0],
            "--question",
            "what colour is the circle?",
            "--question",
            "how many shapes are there?",
        ]
    )[0]
    failures += _run(
        [
            "match",
            "--model",
            str(models / "retrieval"),
            "--image",
            images[0],
            "--text",
            test_rows[0]["captions"][0],
            "--text",
            test_rows[1]["captions"][0],
        ]
    )[0]
    failures += _run(
        [
            "similarity",
            "--model",
            str(models / "retrieval"),
            "--image",
            images[0],
            "--image",
            images[1],
            "--text",
            test_rows[0]["captions"][0],
        ]
    )[0]
    print("references for the first images:", [row["captions"][0] for row in test_rows[:2]])
    print("note: these tiny models are untrained, so their words are random; training and CapFilt come next.")
    return 0 if failures == 0 else 1
