"""Golden outputs of three tiny checkpoints (caption, VQA, retrieval), stored in this folder: drift is caught even
where transformers is not installed.

Each `<kind>/` folder is a complete Hugging Face checkpoint made by transformers with random weights and the shapes
vocabulary (`blip.data.vocab`), about 100 KB each; `expected.json` holds transformers' outputs for fixed inputs:
caption token ids, texts and scores (greedy and beam, with and without a prompt), VQA answers (greedy and beam),
ITM probabilities and ITC similarities. `test_golden.py` checks that blip gives exactly these ids and texts and
scores within 1e-4, and (with transformers installed) that they are still transformers' outputs.

Regenerate (needs transformers; rewrites the folders and expected.json, after checking blip agrees):

    .venv/bin/python tests/golden/golden_outputs.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected.json"
KINDS = ("caption", "vqa", "retrieval")
IMAGE_SEED = 17
N_IMAGES = 3
MAX_NEW_TOKENS = 12
CAPTION_SETTINGS = [
    {"prompt": None, "num_beams": 1},
    {"prompt": None, "num_beams": 3},
    {"prompt": "a picture of", "num_beams": 1},
    {"prompt": "a picture of", "num_beams": 3},
]
QUESTIONS = ["what color is the circle?", "how many shapes are there?", "where is the square?"]
TEXTS = ["a red circle on the left", "two shapes: a blue square and a star", "a green triangle"]
SCORE_TOLERANCE = 1e-4


def _tests_dir_on_path() -> None:
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))


def images() -> list:
    _tests_dir_on_path()
    from oracle import make_images

    return make_images(N_IMAGES, seed=IMAGE_SEED)


def folder(kind: str) -> Path:
    return HERE / kind


# --- blip ----------------------------------------------------------------------------------------------------------


def blip_outputs() -> dict[str, Any]:
    import blip

    pictures = images()
    caption = blip.load(folder("caption"))
    captions = []
    for settings in CAPTION_SETTINGS:
        results = caption.caption(pictures, max_new_tokens=MAX_NEW_TOKENS, **settings)
        captions.append([{"token_ids": c.token_ids, "text": c.text, "score": c.score} for c in results])
    vqa = blip.load(folder("vqa"))
    answers = []
    for num_beams in (1, 3):
        results = vqa.answer(pictures, QUESTIONS, num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS)
        answers.append([{"token_ids": a.token_ids, "text": a.text, "score": a.score} for a in results])
    retrieval = blip.load(folder("retrieval"))
    itm = [retrieval.match(picture, TEXTS) for picture in pictures]
    itc = retrieval.similarity(pictures, TEXTS).tolist()
    return {"caption": captions, "vqa": answers, "itm": itm, "itc": itc}


# --- transformers --------------------------------------------------------------------------------------------------


def hf_outputs() -> dict[str, Any]:
    import transformers

    pictures = images()
    model = transformers.BlipForConditionalGeneration.from_pretrained(folder("caption")).eval()
    processor = transformers.BlipProcessor.from_pretrained(folder("caption"))
    captions = []
    for settings in CAPTION_SETTINGS:
        row = []
        for picture in pictures:
            inputs = processor(images=picture, text=settings["prompt"], return_tensors="pt")
            prefix = inputs["input_ids"].shape[1] - 1 if settings["prompt"] else 1
            row.append(_generate(model, processor, inputs, settings["num_beams"], prefix))
        captions.append(row)
    model = transformers.BlipForQuestionAnswering.from_pretrained(folder("vqa")).eval()
    processor = transformers.BlipProcessor.from_pretrained(folder("vqa"))
    answers = []
    for num_beams in (1, 3):
        row = []
        for picture, question in zip(pictures, QUESTIONS):
            inputs = processor(images=picture, text=question, return_tensors="pt")
            row.append(_generate(model, processor, inputs, num_beams, 1))
        answers.append(row)
    model = transformers.BlipForImageTextRetrieval.from_pretrained(folder("retrieval")).eval()
    processor = transformers.BlipProcessor.from_pretrained(folder("retrieval"))
    itm, itc = [], []
    with torch.no_grad():
        for picture in pictures:
            itm_row, itc_row = [], []
            for text in TEXTS:
                inputs = processor(images=picture, text=text, return_tensors="pt")
                itm_row.append(model(**inputs).itm_score.softmax(-1)[0, 1].item())
                itc_row.append(model(**inputs, use_itm_head=False).itm_score[0, 0].item())
            itm.append(itm_row)
            itc.append(itc_row)
    return {"caption": captions, "vqa": answers, "itm": itm, "itc": itc}


def _generate(model, processor, inputs, num_beams: int, prefix: int) -> dict[str, Any]:
    with torch.no_grad():
        out = model.generate(
            **inputs,
            num_beams=num_beams,
            max_new_tokens=MAX_NEW_TOKENS,
            output_scores=True,
            return_dict_in_generate=True,
        )
    ids = out.sequences[0].tolist()
    if num_beams > 1:
        score = out.sequences_scores[0].item()
    else:
        tokens = out.sequences[0, prefix:]
        score = sum(torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens))
    return {"token_ids": ids, "text": processor.decode(out.sequences[0], skip_special_tokens=True), "score": score}


# --- comparing -----------------------------------------------------------------------------------------------------


def differences(actual: Any, expected: Any, where: str = "") -> list[str]:
    """Where `actual` differs from `expected`: ids and texts exactly, floats within SCORE_TOLERANCE."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            return [f"{where}: keys {sorted(actual) if isinstance(actual, dict) else actual} != {sorted(expected)}"]
        return [d for key in expected for d in differences(actual[key], expected[key], f"{where}.{key}")]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{where}: {actual} != {expected}"]
        return [d for i, (a, e) in enumerate(zip(actual, expected)) for d in differences(a, e, f"{where}[{i}]")]
    if isinstance(expected, float):
        return [] if abs(actual - expected) <= SCORE_TOLERANCE else [f"{where}: {actual} != {expected}"]
    return [] if actual == expected else [f"{where}: {actual!r} != {expected!r}"]


# --- regenerating --------------------------------------------------------------------------------------------------


def regenerate() -> None:
    _tests_dir_on_path()
    from blip.data.vocab import shapes_vocab_tokens
    from oracle import TinySpec, build_hf_checkpoint

    sizes = dict(
        vision_hidden=16,
        vision_heads=2,
        vision_mlp=32,
        text_hidden=16,
        text_heads=2,
        text_ffn=32,
        vocab=tuple(shapes_vocab_tokens()),
    )
    eos_bias = {"caption": 3.0, "vqa": 5.3, "retrieval": 0.0}  # generations that end at different lengths
    for seed, kind in enumerate(KINDS):
        shutil.rmtree(folder(kind), ignore_errors=True)
        build_hf_checkpoint(folder(kind), TinySpec(kind=kind, seed=100 + seed, eos_bias=eos_bias[kind], **sizes))
    expected = hf_outputs()
    problems = differences(blip_outputs(), expected)
    if problems:
        raise SystemExit("blip disagrees with transformers on the new checkpoints:\n" + "\n".join(problems[:20]))
    EXPECTED.write_text(json.dumps(expected, indent=1) + "\n")
    lengths = {k: sorted({len(c["token_ids"]) for row in expected[k] for c in row}) for k in ("caption", "vqa")}
    print(f"wrote {EXPECTED} and {', '.join(KINDS)}/ (generated lengths {lengths})")


if __name__ == "__main__":
    regenerate()
