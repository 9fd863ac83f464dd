"""Writing a shapes dataset to a folder (`generate`), in the formats real datasets use.

On disk (``generate`` / ``blip data shapes --out DIR``)::

    images/<split>/<index:06d>.png      split in clean, web, vqa, test
    clean.jsonl   {"id", "image", "captions": [5], "scene"}
    test.jsonl    {"id", "image", "captions": [5], "scene"}
    web.jsonl     {"id", "image", "caption", "noise", "noise_detail", "source", "scene"}
                  noise: correct|partial|unrelated|junk; noise_detail: the swapped attribute of a partial caption
                  (color|shape|position); source: for unrelated, the id of the image whose scene the caption
                  describes (a fresh paraphrase of it); scene: the true scene (`Scene.to_dict`), in every manifest
    vqa.jsonl, vqa_test.jsonl
                  {"id", "question_id", "image_id", "image", "question", "answer", "answers": [10],
                   "answer_type", "question_type"}   (one row per question)
    answer_list.json                    every canonical answer, for rank-mode VQA
    dataset_shapes.json                 Karpathy-style captions ("dataset_coco.json"): clean as split "train",
                                        test as split "test"; filepath + filename, sentences with raw and tokens
    captions_test_coco.json             COCO caption annotations of the test split (what pycocoevalcap reads)
    vqa_test_questions.json, vqa_test_annotations.json
                                        a VQAv2-style question / annotation pair for the test questions
    web-000000.tar ...                  with ``webdataset=True``: WebDataset shards of the web split, members
                                        <key>.png, <key>.txt (the caption), <key>.json (the web.jsonl row)
    meta.json                           seed, arguments, counts, noise rates, vocabulary size, file list

``"image"`` paths are relative to the output folder; ``"id"`` is ``"<split>-<index:06d>"`` (VQA rows add the question
number); integer ``image_id``/``question_id`` are the index within the split and ``image_id * 100 + k``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from blip.data.shapes.drawing import render
from blip.data.shapes.examples import Example, make_example
from blip.data.shapes.scene import NOISE_KINDS, SPLITS, ShapesConfig
from blip.data.shapes.words import ANSWER_LIST, tokenize, vocabulary
from blip.io import atomic_write_bytes, json_bytes, jsonl_bytes

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

_MANIFESTS = {
    "clean": "clean.jsonl",
    "web": "web.jsonl",
    "vqa": "vqa.jsonl",
    "test": "test.jsonl",
    "vqa_test": "vqa_test.jsonl",
}
_JSON_FILES = (
    "answer_list.json",
    "dataset_shapes.json",
    "captions_test_coco.json",
    "vqa_test_questions.json",
    "vqa_test_annotations.json",
)
_TAR_RE = re.compile(r"^web-\d{6}\.tar$")


def _write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, fsync=False)  # thousands of small files: durability is not worth an fsync each


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A reproducible tar (fixed mtime, owner and mode) of the given (name, data) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _run_chunk(task: tuple[str, int, int, int, ShapesConfig, str, int | None]) -> tuple[str, int, list[Example]]:
    """Make images start..stop of a split (skipping PNGs already there), plus their WebDataset shard if asked."""
    split, start, stop, seed, cfg, out_dir, shard = task
    out = Path(out_dir)
    examples = []
    members: list[tuple[str, bytes]] = []
    shard_path = out / f"web-{shard:06d}.tar" if shard is not None else None
    need_shard = shard_path is not None and not shard_path.exists()
    for index in range(start, stop):
        ex = make_example(split, index, seed=seed, cfg=cfg)
        examples.append(ex)
        path = out / ex.image
        if path.exists():
            data = path.read_bytes() if need_shard else b""
        else:
            data = _png_bytes(render(ex.scene, cfg))
            _write(path, data)
        if need_shard:
            row = ex.rows["web"][0]
            key = f"{index:06d}"
            members += [
                (f"{key}.png", data),
                (f"{key}.txt", row["caption"].encode()),
                (f"{key}.json", json_bytes(row)),
            ]
    if need_shard and shard_path is not None:
        _write(shard_path, _tar_bytes(members))
    return split, start, examples


def _check_folder(out: Path, args: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix datasets: a non-empty folder must hold a dataset made with the same arguments."""
    if not out.exists() or not any(out.iterdir()):
        return
    if overwrite:
        shutil.rmtree(out / "images", ignore_errors=True)
        for p in out.iterdir():
            if p.name in _MANIFESTS.values() or p.name in _JSON_FILES or p.name == "meta.json" or _TAR_RE.match(p.name):
                p.unlink()
        return
    meta_path = out / "meta.json"
    if not meta_path.exists():
        raise FileExistsError(
            f"{out} is not empty and holds no shapes dataset (no meta.json); choose an empty folder "
            "or pass overwrite=True (--overwrite) to write into it anyway"
        )
    old = json.loads(meta_path.read_text()).get("args", {})
    if old != args:
        diff = sorted(k for k in set(old) | set(args) if old.get(k) != args.get(k))
        raise FileExistsError(
            f"{out} holds a shapes dataset made with different arguments (differing: {', '.join(diff)}); "
            "pass overwrite=True (--overwrite) to replace it, or choose another folder"
        )


def _karpathy(clean: list[Example], test: list[Example]) -> dict[str, Any]:
    images, sentid = [], 0
    for imgid, (ex, split) in enumerate([(e, "train") for e in clean] + [(e, "test") for e in test]):
        caps = ex.rows[ex.split][0]["captions"]
        sentences = [
            {"tokens": tokenize(c), "raw": c, "imgid": imgid, "sentid": sentid + k} for k, c in enumerate(caps)
        ]
        images.append(
            {
                "filepath": f"images/{ex.split}",
                "filename": f"{ex.index:06d}.png",
                "imgid": imgid,
                "split": split,
                "id": ex.rows[ex.split][0]["id"],
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
        sentid += len(caps)
    return {"dataset": "shapes", "images": images}


def _coco_captions(test: list[Example], cfg: ShapesConfig) -> dict[str, Any]:
    images, annotations = [], []
    for ex in test:
        images.append({"id": ex.index, "file_name": ex.image, "width": cfg.image_size, "height": cfg.image_size})
        for c in ex.rows["test"][0]["captions"]:
            annotations.append({"image_id": ex.index, "id": len(annotations), "caption": c})
    info = {"description": "shapes world test split captions", "version": str(FORMAT_VERSION)}
    return {"info": info, "licenses": [], "type": "captions", "images": images, "annotations": annotations}


def _vqa_pair(test: list[Example]) -> tuple[dict[str, Any], dict[str, Any]]:
    rows = [r for ex in test for r in ex.rows["vqa_test"]]
    common = {"info": {"description": "shapes world VQA test"}, "license": {}, "data_type": "shapes"}
    qs = {
        **common,
        "task_type": "Open-Ended",
        "data_subtype": "test",
        "questions": [
            {"image_id": r["image_id"], "question": r["question"], "question_id": r["question_id"]} for r in rows
        ],
    }
    anns = {
        **common,
        "data_subtype": "test",
        "annotations": [
            {
                "question_id": r["question_id"],
                "image_id": r["image_id"],
                "question_type": r["question_type"],
                "answer_type": r["answer_type"],
                "multiple_choice_answer": r["answer"],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(r["answers"])
                ],
            }
            for r in rows
        ],
    }
    return qs, anns


def generate(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_clean: int = 2000,
    n_web: int = 20000,
    n_vqa: int = 2000,
    n_test: int = 500,
    cfg: ShapesConfig = ShapesConfig(),
    webdataset: bool = False,
    shard_size: int = 1000,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a shapes dataset to ``out_dir`` (layout in the module docstring) and return its ``meta.json`` content.

    Re-running with the same arguments skips images (and shards) already written and rewrites the manifests; a
    non-empty folder made with other arguments (or not a shapes dataset) is refused with `FileExistsError` unless
    ``overwrite`` is set, which first deletes this generator's outputs there. Output is identical for any
    ``workers``.
    """
    counts = {"clean": n_clean, "web": n_web, "vqa": n_vqa, "test": n_test}
    if any(n < 0 for n in counts.values()) or shard_size < 1 or workers < 1:
        raise ValueError("counts must be >= 0, shard_size and workers >= 1")
    out = Path(out_dir)
    args = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        **{f"n_{k}": v for k, v in counts.items()},
        "cfg": dataclasses.asdict(cfg),
        "webdataset": webdataset,
        "shard_size": shard_size,
    }
    args = json.loads(json.dumps(args))  # tuples -> lists, as read back from meta.json
    _check_folder(out, args, overwrite)
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"generator": "blip.data.shapes", "seed": seed, "args": args, "complete": False}
    _write(out / "meta.json", json_bytes(meta))

    tasks = []
    for split, n in counts.items():
        step = shard_size if (split == "web" and webdataset) else 250
        for start in range(0, n, step):
            shard = start // shard_size if (split == "web" and webdataset) else None
            tasks.append((split, start, min(n, start + step), seed, cfg, str(out), shard))
    t0 = time.perf_counter()
    examples: dict[str, list[Example]] = {split: [] for split in SPLITS}
    with tqdm(total=sum(counts.values()), desc="shapes", unit="img", disable=not progress) as bar:
        if workers > 1 and len(tasks) > 1:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(min(workers, len(tasks))) as pool:
                for split, _, chunk in pool.imap(_run_chunk, tasks):
                    examples[split] += chunk
                    bar.update(len(chunk))
        else:
            for task in tasks:
                split, _, chunk = _run_chunk(task)
                examples[split] += chunk
                bar.update(len(chunk))
    elapsed = time.perf_counter() - t0

    manifests: dict[str, list[dict[str, Any]]] = {name: [] for name in _MANIFESTS}
    for split in SPLITS:
        for ex in examples[split]:
            for name, rows in ex.rows.items():
                manifests[name] += rows
    for name, file in _MANIFESTS.items():
        _write(out / file, jsonl_bytes(manifests[name]))
    _write(out / "answer_list.json", json_bytes(list(ANSWER_LIST)))
    _write(out / "dataset_shapes.json", json_bytes(_karpathy(examples["clean"], examples["test"])))
    _write(out / "captions_test_coco.json", json_bytes(_coco_captions(examples["test"], cfg)))
    qs, anns = _vqa_pair(examples["test"])
    _write(out / "vqa_test_questions.json", json_bytes(qs))
    _write(out / "vqa_test_annotations.json", json_bytes(anns))

    shards = sorted(p.name for p in out.iterdir() if _TAR_RE.match(p.name)) if webdataset else []
    web_rows = manifests["web"]
    meta.update(
        {
            "complete": True,
            "counts": {
                "images": counts,
                "clean_captions": sum(len(r["captions"]) for r in manifests["clean"]),
                "test_captions": sum(len(r["captions"]) for r in manifests["test"]),
                "vqa_questions": len(manifests["vqa"]),
                "vqa_test_questions": len(manifests["vqa_test"]),
                "web_noise": {k: sum(r["noise"] == k for r in web_rows) for k in NOISE_KINDS},
                "web_partial": dict(sorted(Counter(r["noise_detail"] for r in web_rows if r["noise_detail"]).items())),
                "webdataset_shards": len(shards),
            },
            "noise_rates": dict(zip(NOISE_KINDS, cfg.noise_rates)),
            "vocab_size": len(vocabulary()),
            "answer_list_size": len(ANSWER_LIST),
            "files": {
                "images": "images/<split>/<index:06d>.png",
                "manifests": dict(_MANIFESTS),
                "answer_list": "answer_list.json",
                "karpathy": "dataset_shapes.json",
                "coco_captions_test": "captions_test_coco.json",
                "vqa_test_questions": "vqa_test_questions.json",
                "vqa_test_annotations": "vqa_test_annotations.json",
                "webdataset": shards,
            },
        }
    )
    _write(out / "meta.json", json_bytes(meta))
    total = sum(counts.values())
    _logger.info("shapes: %d images in %.1fs (%.0f img/s) -> %s", total, elapsed, total / max(elapsed, 1e-9), out)
    return meta
