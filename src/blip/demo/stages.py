"""`blip demo` / `make demo`: the paper's CapFilt story on the shapes world, end to end, on a CPU in minutes.

1. generate the shapes world: noisy web captions (with their noise labels), a small clean split, VQA, a test split;
2. pretrain a tiny BLIP (ITC + ITM + LM) on web + clean captions, its ViT started from one trained to name the shape
   under each patch of scenes of its own (the paper starts from an ImageNet ViT; `vision` in the config,
   `blip.train.vision`);
3. fine-tune it into a captioner (LM on clean captions) and a filter (ITC + ITM on clean captions);
4. CapFilt: a synthetic caption per web image (nucleus sampling), the filter's verdict on every web and synthetic
   text (`blip.capfilt.run_capfilt`);
5. pretrain the same architecture again, from scratch, on the bootstrapped data (kept web + kept synthetic + clean),
   with the same steps, schedule and seed;
6. evaluate both pretrained models the same way: zero-shot retrieval, and captioning and VQA after the same
   fine-tuning budget (captioning `caption_finetunes` times with their own seeds, the numbers their mean; the web
   model's first captioning fine-tune is the captioner of step 3); fine-tunes that need nothing of each other run
   side by side in `processes` one-thread processes;
7. write `metrics.json` and `report.html` (PNGs beside it) into the output folder.

Stage configs are data (`configs/demo_shapes.py`, a `get_config(smoke=False) -> DemoConfig`). Every stage writes
its results into its own folder and a `stage.json` when it is done; a rerun skips finished stages and resumes an
interrupted training run from its checkpoint. Delete a stage's folder (and those after it) to redo it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blip.capfilt import CapfiltConfig
from blip.demo.report import write_report
from blip.io import atomic_write_bytes, atomic_write_json, jsonl_bytes, read_jsonl
from blip.train.config import TrainConfig
from blip.train.vision import VisionPretrainConfig

if TYPE_CHECKING:
    import random

    from blip.data.shapes import Scene

_logger = logging.getLogger(__name__)

ARMS = ("web", "capfilt")
DEFAULT_CONFIG = "configs/demo_shapes.py"
FILTER_DEFINITION = (
    "positive class = a noisy web caption (partial, unrelated or junk: false for its image); predicted positive = "
    "the filter removes it (its score - ITM P(match), with the ITC cosine when metrics.filter.itc_weight > 0 - below "
    "the threshold). precision = noisy among removed, recall = removed among noisy."
)


_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("blip_demo_stage", default="")


class DemoConfigError(ValueError):
    """A demo config that cannot be used (missing file, wrong type, an output folder made with another config)."""


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does. Stage `TrainConfig`s leave data, init and output folders empty: the demo sets them."""

    seed: int = 0  # the world, model init, data order and CapFilt sampling all follow it
    n_web: int = 4000  # noisy web images, one caption each
    n_clean: int = 300  # clean "human-annotated" images, 5 captions each (the COCO stand-in)
    n_vqa: int = 500  # VQA training images, 5 questions each
    n_test: int = 200  # test images: 5 references and 5 questions each
    noise_rates: tuple[float, float, float, float] = (0.5, 0.2, 0.2, 0.1)  # web: correct, partial, unrelated, junk
    world_image_size: int = 64  # pixels of the generated images
    max_shapes: int = 3  # shapes per image, at most
    threads: int = 1  # torch CPU threads for every stage (0 = torch's default)
    # fine-tunes that do not wait for each other (after each pretraining run) run side by side in this many processes
    # of one torch thread each; 1: one after another with `threads`. Like `threads`, not part of a run's identity.
    processes: int = 1
    # the ViT's supervised start (the world's ImageNet: per patch, the shape under it and its place); None: a random ViT
    vision: VisionPretrainConfig | None = None
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(task="pretrain", max_steps=600))
    alpha_ramp_steps: int = 150  # pretraining: momentum-distillation alpha ramps in over this many steps
    caption: TrainConfig = field(default_factory=lambda: TrainConfig(task="caption"))
    filter: TrainConfig = field(default_factory=lambda: TrainConfig(task="retrieval"))
    vqa: TrainConfig = field(default_factory=lambda: TrainConfig(task="vqa"))
    capfilt: CapfiltConfig = field(default_factory=CapfiltConfig)
    # captioning fine-tunes per arm, each with its own seed (the first with the demo's: the web arm's first is the
    # captioner); an arm's CIDEr, BLEU-4 and ROUGE-L are their mean. One fine-tune's CIDEr moved by up to 14 with
    # its seed
    caption_finetunes: int = 1
    # Clean images held out of the filter's training (and of pretraining, which it starts from) to choose its
    # threshold on: images pretraining has read score higher than the web's, and the threshold came out too strict.
    filter_val_images: int = 50
    hard_negatives: int = 3  # written ITM negatives per clean caption for the filter (0: mined negatives only)
    # per clean image, this many web texts of other images (checked false for it) join its written negatives: the
    # filter sees the kind of text it will judge - ads, other images' captions - as non-matches (never their labels)
    web_negatives: int = 0
    # per clean caption, up to this many more written negatives that move a shape to another place (a position swap
    # alone): the filter learns a wrong place last and slowly, and among negatives drawn evenly from the categories it
    # hardly learns it at all
    position_negatives: int = 0
    # what the written negatives change (of `blip.data.shapes.NEGATIVE_SWAPS`); empty: every kind of phrase
    negative_categories: tuple[str, ...] = ()
    threshold_on_validation: bool = True  # the filter's threshold from the validation images (else capfilt's)
    # None: the validation cut with the best balanced accuracy; a share: the strictest cut keeping that share of the
    # validation images' true captions (`blip.capfilt.choose_threshold`)
    filter_keep_true: float | None = None
    # the ITC weights the filter's score may take (`blip.capfilt.filter_score`); the one whose scores best separate the
    # validation images' true and false texts (ROC AUC) is used, before the threshold is chosen. (0.0,): ITM alone
    filter_itc_weights: tuple[float, ...] = (0.0,)
    k_test: int = 16  # retrieval: candidates re-ranked with ITM per query
    untrained_baseline: bool = True  # also evaluate the architecture with random weights (about a CPU minute)
    examples: int = 12  # example images in the report

    def __post_init__(self) -> None:
        for name, task in (("pretrain", "pretrain"), ("caption", "caption"), ("filter", "retrieval"), ("vqa", "vqa")):
            if getattr(self, name).task != task:
                raise ValueError(f"DemoConfig.{name} must be a {task!r} TrainConfig, got {getattr(self, name).task!r}")
        if self.pretrain.max_steps < 1:
            raise ValueError("DemoConfig.pretrain needs max_steps: both pretraining runs take the same number of steps")
        if min(self.n_web, self.n_clean, self.n_vqa, self.n_test) < 1:
            raise ValueError("every split needs at least one image")
        if not 1 <= self.filter_val_images < self.n_clean:
            raise ValueError("filter_val_images must leave the filter at least one clean image to train on")
        if self.caption_finetunes < 1 or self.processes < 1:
            raise ValueError(
                f"caption_finetunes and processes must be >= 1, got {self.caption_finetunes} and {self.processes}"
            )
        counts = ("hard_negatives", "web_negatives", "position_negatives")
        negative = [f"{n}={getattr(self, n)}" for n in counts if getattr(self, n) < 0]
        if negative:
            raise ValueError(f"negative counts must be >= 0, got {', '.join(negative)}")
        if self.filter_keep_true is not None and not 0 < self.filter_keep_true <= 1:
            raise ValueError(f"filter_keep_true must be in (0, 1] or None, got {self.filter_keep_true}")
        if not self.filter_itc_weights or not all(0 <= w < math.inf for w in self.filter_itc_weights):
            raise ValueError(f"filter_itc_weights must be numbers >= 0 (at least one), got {self.filter_itc_weights}")
        from blip.data.shapes.grammar import check_negative_categories

        check_negative_categories(self.negative_categories)

    def replace(self, **changes: Any) -> DemoConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_demo_config(path: str | Path | None = None, *, smoke: bool = False) -> DemoConfig:
    """The demo config file's `get_config(smoke)`: `path`, else `configs/demo_shapes.py` in the working directory or
    in the source tree this package lives in."""
    candidates = [Path(path)] if path else [Path(DEFAULT_CONFIG), Path(__file__).resolve().parents[3] / DEFAULT_CONFIG]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise DemoConfigError(f"demo config not found (looked for {', '.join(map(str, candidates))})")
    spec = importlib.util.spec_from_file_location(f"blip_demo_config_{found.stem}", found)
    if spec is None or spec.loader is None:
        raise DemoConfigError(f"cannot import {found}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(smoke=smoke)
    if not isinstance(cfg, DemoConfig):
        raise DemoConfigError(f"{found}: get_config returned {type(cfg).__name__}, expected DemoConfig")
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# Stages: run once, remember the result and the time.


@dataclass(frozen=True)
class Stage:
    """A stage `Stages.run_side_by_side` may run in another process: `fn(*args)` (a module-level function, picklable
    arguments), its results in `folder`."""

    name: str
    folder: Path
    what: str
    fn: Callable[..., dict[str, Any]]
    args: tuple[Any, ...] = ()


class Stages:
    """Runs named stages in order (`run`), or several at once (`run_side_by_side`); a stage whose folder holds
    `stage.json` is not run again."""

    def __init__(self, total: int, say: Callable[[str], None]):
        self.total, self.say = total, say
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds of the process that ran it (all threads)
        self.threads: dict[str, int | None] = {}  # torch threads each stage ran with (None: a marker from before)
        self.wall = 0.0  # seconds of the stages so far, side-by-side ones counted once (a kept stage: as it took)
        self.started = time.perf_counter()
        self.count = 0

    def _head(self, name: str) -> str:
        self.count += 1
        return f"[{self.count}/{self.total}] {name}"

    def _kept(self, name: str, folder: Path, head: str) -> dict[str, Any] | None:
        marker = folder / "stage.json"
        if not marker.is_file():
            return None
        record = json.loads(marker.read_text())
        self.timings[name] = record["seconds"]
        self.cpu[name] = record.get("cpu_seconds", 0.0)
        self.threads[name] = record.get("threads")
        self.say(f"{head}: done earlier ({record['seconds']:.0f}s) - kept")
        return record

    def _record(self, name: str, folder: Path, head: str, result: dict, seconds: float, cpu: float, threads: int):
        folder.mkdir(parents=True, exist_ok=True)
        record = {"seconds": seconds, "cpu_seconds": cpu, "threads": threads, "result": result}
        atomic_write_json(folder / "stage.json", record)  # never half a marker
        self.timings[name], self.cpu[name], self.threads[name] = seconds, cpu, threads
        elapsed = time.perf_counter() - self.started
        self.say(f"{head}: done in {seconds:.0f}s (elapsed {elapsed / 60:.1f} min)")

    def run(self, name: str, folder: Path, what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        head = self._head(name)
        record = self._kept(name, folder, head)
        if record is not None:
            self.wall += record["seconds"]
            return record["result"]
        self.say(f"{head}: {what} ...")
        result, seconds, cpu, threads = _timed(fn, (), f"demo {self.count}/{self.total} {name}")
        self._record(name, folder, head, result, seconds, cpu, threads)
        self.wall += seconds
        return result

    def run_side_by_side(self, group: list[Stage], processes: int) -> dict[str, dict[str, Any]]:
        """Every stage's result by name. With `processes` > 1 the unfinished stages run in that many spawned
        processes of one torch thread each (on 2 cores two one-thread fine-tunes side by side take ~72% of their time
        one after another with two threads); else one after another here, as `run`. A stage that fails stops the
        others not yet started and its error is raised once the running ones are done (their markers are written)."""
        if processes <= 1:
            return {
                stage.name: self.run(stage.name, stage.folder, stage.what, functools.partial(stage.fn, *stage.args))
                for stage in group
            }
        results: dict[str, dict[str, Any]] = {}
        pending: list[tuple[Stage, str, str]] = []
        kept_seconds = 0.0
        for stage in group:
            head = self._head(stage.name)
            record = self._kept(stage.name, stage.folder, head)
            if record is None:
                pending.append((stage, head, f"demo {self.count}/{self.total} {stage.name}"))
            else:
                results[stage.name] = record["result"]
                kept_seconds = max(kept_seconds, record["seconds"])
        if not pending:
            self.wall += kept_seconds
            return results
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        t0 = time.perf_counter()
        workers = min(processes, len(pending))
        self.say(f"{', '.join(head for _, head, _ in pending)}: side by side in {workers} processes ...")
        error: BaseException | None = None
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=spawn, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = {
                pool.submit(_timed, stage.fn, stage.args, label): (stage, head) for stage, head, label in pending
            }
            for future in as_completed(futures):
                stage, head = futures[future]
                try:
                    result, seconds, cpu, threads = future.result()
                except BaseException as e:  # the first error wins; stages not yet started are dropped
                    error = error or e
                    for other in futures:
                        other.cancel()
                    continue
                self._record(stage.name, stage.folder, head, result, seconds, cpu, threads)
                results[stage.name] = result
        self.wall += time.perf_counter() - t0
        if error is not None:
            raise error
        return {stage.name: results[stage.name] for stage in group}


def _timed(
    fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], label: str
) -> tuple[dict[str, Any], float, float, int]:
    """`fn(*args)` with training progress bars labelled `label`: its result, wall and CPU seconds, and the torch
    threads it ran with. Runs in a side-by-side stage's process too."""
    t0, c0 = time.perf_counter(), time.process_time()
    token = _LABEL.set(label)
    try:
        result = fn(*args)
    finally:
        _LABEL.reset(token)
    return result, time.perf_counter() - t0, time.process_time() - c0, torch.get_num_threads()


def print_line(message: str) -> None:
    """One line to stdout, flushed at once: the stages' default `say`."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------------------
# The pieces of the story.


def generate_world(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from blip.data import shapes

    world = shapes.ShapesConfig(image_size=cfg.world_image_size, max_shapes=cfg.max_shapes, noise_rates=cfg.noise_rates)
    meta = shapes.generate(
        folder,
        seed=cfg.seed,
        n_clean=cfg.n_clean,
        n_web=cfg.n_web,
        n_vqa=cfg.n_vqa,
        n_test=cfg.n_test,
        cfg=world,
        workers=max(2, cfg.threads),  # image rendering processes
        progress=True,
    )
    return {"counts": meta["counts"], "noise_rates": meta["noise_rates"]}


def pretrain_vision_stage(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    """The world's ImageNet: the pretraining architecture's ViT learns to name, patch by patch, the kind, colour and
    place of the shape under each patch (`labelled_scenes`: scenes of the demo's world from a random stream of their
    own, no image of the splits); every pretraining starts from it."""
    from blip.data.shapes import PATCH_LABELS, ShapesConfig, labelled_scenes
    from blip.train.vision import pretrain_vision
    from blip.transforms import ImageTransform

    assert cfg.vision is not None
    world = ShapesConfig(image_size=cfg.world_image_size, max_shapes=cfg.max_shapes)
    transform = ImageTransform(cfg.pretrain.image_size)
    grid = cfg.pretrain.image_size // cfg.pretrain.patch_size

    def labelled(n: int, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = labelled_scenes(n, grid=grid, seed=cfg.seed, part=part, cfg=world)
        return transform(images), torch.tensor(labels)

    train, test = labelled(cfg.vision.images, "train"), labelled(cfg.vision.eval_images, "test")
    classes = {name: len(values) for name, values in PATCH_LABELS.items()}
    return pretrain_vision(cfg.pretrain, cfg.vision, train, test, classes, folder, seed=cfg.seed)


def _count_pairs(data: str) -> int:
    """Training pairs in `data`; a row the trainer would skip (e.g. an image path it cannot find) is an error here,
    since a silently smaller set would skew the comparison."""
    from blip.data.manifests import SkipLog, read_pairs, resolve_sources

    skips = SkipLog()
    pairs = read_pairs(resolve_sources(data, "pretrain"), skips=skips)
    if skips.total:
        raise RuntimeError(
            f"{data}: {skips.total} rows would be skipped in training: {skips.summary()} {skips.examples}"
        )
    return len(pairs)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from blip.train.recipe import run

    summary = run(cfg.replace(label=_LABEL.get() or cfg.label))
    if not summary.finished:
        raise RuntimeError(f"training in {cfg.out_dir} stopped before its last step")
    return {
        "steps": summary.step,
        "seconds": summary.seconds,
        "losses": summary.losses,
        "test": summary.evaluation,
        "checkpoint": str(Path(cfg.out_dir) / "checkpoint.pt"),
        "model": str(Path(cfg.out_dir) / "model"),
    }


def pretrain(cfg: DemoConfig, data: str, folder: Path, data_dir: Path) -> dict[str, Any]:
    """Pretrain from scratch on `data`, then evaluate zero-shot retrieval on the test split."""
    from blip.api import load
    from blip.evaluation.run import evaluate, write_result

    pairs = _count_pairs(data)
    steps_per_epoch = max(1, pairs // cfg.pretrain.batch_size)
    train_cfg = cfg.pretrain.replace(
        data=data,
        out_dir=str(folder),
        seed=cfg.seed,
        threads=cfg.threads,
        eval_data="",
        alpha_ramp_epochs=cfg.alpha_ramp_steps / steps_per_epoch,
    )
    result = _train(train_cfg)
    blip_model = load(result["checkpoint"], batch_size=64)
    with torch.inference_mode():
        zero_shot = evaluate(blip_model, "retrieval", str(data_dir), max_images=cfg.n_test, k_test=cfg.k_test)
    write_result(zero_shot, folder, name="eval_zero_shot_retrieval")
    result["pairs"] = pairs
    result["epochs"] = result["steps"] / steps_per_epoch
    result["test"] = {"retrieval": zero_shot.metrics}
    return result


def finetune(
    cfg: DemoConfig,
    base: TrainConfig,
    init: str,
    data_dir: Path,
    folder: Path,
    data: str = "",
    seed: int | None = None,
) -> dict[str, Any]:
    """Fine-tune `init` on the world's task split (clean captions or VQA; or `data`) and evaluate on the test split.
    `seed`: the fine-tune's own (default the demo's)."""
    train_cfg = base.replace(
        data=data or str(data_dir),
        data_split="",
        init=init,
        out_dir=str(folder),
        seed=cfg.seed if seed is None else seed,
        threads=cfg.threads,
        eval_data=str(data_dir),
        eval_max_images=cfg.n_test,
        eval_k_test=cfg.k_test,
    )
    return _train(train_cfg)


def clean_split(cfg: DemoConfig, data_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The clean split's rows: (those everything trains on, the last `filter_val_images` held out to choose the
    filter's threshold on)."""
    rows = read_jsonl(data_dir / "clean.jsonl")
    n_val = min(cfg.filter_val_images, len(rows) - 1)
    return rows[: len(rows) - n_val], rows[len(rows) - n_val :]


def pretraining_clean(cfg: DemoConfig, data_dir: Path) -> Path:
    """`clean_pretrain.jsonl` beside the data folder: the clean captions every pretraining run reads and every
    bootstrapped dataset adds unfiltered (`clean_split`'s first part: no validation image). Image paths absolute."""
    path = data_dir.parent / "clean_pretrain.jsonl"
    if not path.is_file():
        rows = [{**row, "image": str((data_dir / row["image"]).resolve())} for row in clean_split(cfg, data_dir)[0]]
        atomic_write_bytes(path, jsonl_bytes(rows))
    return path


def _false_texts(scene: Scene, texts: list[str], n: int, rng: random.Random) -> list[str]:
    """Up to `n` distinct texts drawn from `texts` that are false for `scene` (the world's parser: `check_caption`);
    gives up after 20 n draws (a pool of mostly true texts)."""
    from blip.data.shapes import check_caption

    out: list[str] = []
    for _ in range(20 * n):
        if len(out) == n:
            break
        text = rng.choice(texts)
        if text not in out and not check_caption(scene, text):
            out.append(text)
    return out


def filter_manifests(cfg: DemoConfig, data_dir: Path, folder: Path) -> tuple[Path, Path]:
    """The filter's data, from the clean split (`clean_split`): `filter_train.jsonl` (each image with
    `hard_negatives` written negatives per caption and up to `position_negatives` position swaps per caption, plus
    `web_negatives` web texts of other images that are false for it) and `filter_val.jsonl` (the held-out images:
    their true captions, and as negatives one written negative per caption plus as many captions of other held-out
    images that are false for this one). Written negatives change a phrase of `negative_categories`. Image paths
    absolute."""
    import random

    from blip.data.shapes import Scene, check_caption
    from blip.data.shapes.grammar import hard_negatives

    train, val = clean_split(cfg, data_dir)
    categories = cfg.negative_categories or None
    rng = random.Random(f"blip.demo/{cfg.seed}/filter")
    web_rng = random.Random(f"blip.demo/{cfg.seed}/filter/web")  # its own: the written negatives stay as they were
    place_rng = random.Random(f"blip.demo/{cfg.seed}/filter/position")  # its own too
    web_texts = [row["caption"] for row in read_jsonl(data_dir / "web.jsonl")] if cfg.web_negatives else []
    folder.mkdir(parents=True, exist_ok=True)
    train_path, val_path = folder / "filter_train.jsonl", folder / "filter_val.jsonl"
    with open(train_path, "w", encoding="utf-8") as f:
        for row in train:
            scene = Scene.from_dict(row["scene"])
            negatives = [
                t for c in row["captions"] for t in hard_negatives(scene, c, rng, cfg.hard_negatives, categories)
            ]
            negatives += _false_texts(scene, web_texts, cfg.web_negatives, web_rng)
            if cfg.position_negatives:
                moved = (
                    t
                    for c in row["captions"]
                    for t in hard_negatives(scene, c, place_rng, cfg.position_negatives, ("position",))
                )
                negatives += [t for t in dict.fromkeys(moved) if t not in negatives]
            image = str((data_dir / row["image"]).resolve())
            out = {"id": row["id"], "image": image, "captions": row["captions"]}
            f.write(json.dumps({**out, "negatives": negatives} if negatives else out) + "\n")
    others = [c for row in val for c in row["captions"]]
    with open(val_path, "w", encoding="utf-8") as f:
        for row in val:
            scene = Scene.from_dict(row["scene"])
            written = [t for c in row["captions"] for t in hard_negatives(scene, c, rng, 1, categories)]
            unrelated = [t for t in others if not check_caption(scene, t)]
            unrelated = rng.sample(unrelated, min(len(row["captions"]), len(unrelated)))
            image = str((data_dir / row["image"]).resolve())
            f.write(json.dumps({"image": image, "captions": row["captions"], "negatives": written + unrelated}) + "\n")
    return train_path, val_path


def train_filter(
    cfg: DemoConfig,
    init: str,
    data_dir: Path,
    folder: Path,
    base: TrainConfig | None = None,
    manifests: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    """Fine-tune the filter (`base`, default `cfg.filter`: ITC + ITM; written negatives when `hard_negatives`) on the
    clean split minus the validation images (`manifests`: `filter_manifests`' two files, written here when not
    given), then choose its threshold on those (`choose_threshold`) unless `threshold_on_validation` is off (then the
    CapFilt config's threshold stays). A pretrain-kind `base` (one model as captioner and filter) is used from its
    checkpoint, as it has no HF folder."""
    base = base or cfg.filter
    train_path, val_path = manifests or filter_manifests(cfg, data_dir, folder)
    result = finetune(cfg, base, init, data_dir, folder, data=str(train_path))
    if base.task == "pretrain":
        result["model"] = result["checkpoint"]
    return {**result, **choose_filter_threshold(cfg, result["model"], val_path)}


def choose_filter_threshold(cfg: DemoConfig, model: str, val_path: Path) -> dict[str, Any]:
    """`{"validation": ..., "itc_weight": ..., "threshold": ...}`: `model`'s scores on the validation manifest, the
    ITC weight of `cfg.filter_itc_weights` that separates its true and false texts best, and the threshold
    `choose_threshold` picks from the scores with it (the CapFilt config's own weight and threshold when
    `threshold_on_validation` is off)."""
    from blip.api import load
    from blip.capfilt import choose_itc_weight, choose_threshold, score_validation

    with torch.inference_mode():
        scores = score_validation(load(model, batch_size=64), read_jsonl(val_path))
    weight, auc = choose_itc_weight(scores, cfg.filter_itc_weights)
    positive, negative = scores.scores(weight)
    chosen = choose_threshold(positive, negative, keep_true=cfg.filter_keep_true)
    validation = {
        "true_texts": len(positive),
        "false_texts": len(negative),
        "auc_by_itc_weight": {str(w): a for w, a in auc.items()},
        "chosen": {**chosen, "itc_weight": weight},
    }
    if not cfg.threshold_on_validation:
        return {"validation": validation, "itc_weight": cfg.capfilt.itc_weight, "threshold": cfg.capfilt.threshold}
    return {"validation": validation, "itc_weight": weight, "threshold": chosen["threshold"]}


def run_capfilt_stage(
    cfg: DemoConfig, captioner: str, filter_model: str, choice: dict[str, Any], data_dir: Path, folder: Path
) -> dict:
    """CapFilt of the web split with the filter's `choice` (`choose_filter_threshold`: its threshold and ITC
    weight)."""
    from blip.capfilt import run_capfilt

    clean = str(pretraining_clean(cfg, data_dir))  # the bootstrapped dataset names its images as this file does
    capfilt_cfg = dataclasses.replace(
        cfg.capfilt,
        seed=cfg.seed,
        threads=cfg.threads,
        keep_clean=clean,
        device="cpu",
        threshold=choice["threshold"],
        itc_weight=choice["itc_weight"],
    )
    summary = run_capfilt(captioner, filter_model, data_dir, folder, capfilt_cfg, progress=True)
    if not summary.complete or summary.dataset is None:
        raise RuntimeError(f"CapFilt did not finish: {summary.failed} failed rows, see {folder / 'errors.jsonl'}")
    out = summary.to_json()
    out["dataset"] = str(summary.dataset)
    return out


def analyse_capfilt(folder: Path, threshold: float) -> dict[str, Any]:
    """The filter against the known noise labels, the synthetic captions against the true scenes, and what each
    pretraining set holds."""
    from blip.capfilt import read_records
    from blip.data.shapes import NOISE_KINDS, Scene, check_caption

    kinds: Counter = Counter()
    removed: Counter = Counter()
    partial: Counter = Counter()  # partly wrong web captions by the attribute swapped (colour, shape, position)
    partial_removed: Counter = Counter()
    synth = Counter()
    distinct: set[str] = set()
    scores: dict[str, list[float]] = {k: [] for k in NOISE_KINDS}
    synth_scores: dict[str, list[float]] = {"true": [], "false": []}
    for record in read_records(folder):
        noise = record.get("noise") or record.get("input_noise")
        kinds[noise] += 1
        removed[noise] += not record["web_keep"]
        if noise == "partial" and record.get("noise_detail"):
            partial[record["noise_detail"]] += 1
            partial_removed[record["noise_detail"]] += not record["web_keep"]
        scores.setdefault(noise, []).append(float(record["web_score"]))
        scene = Scene.from_dict(record["scene"])
        for s in record["synthetic"]:
            ok = check_caption(scene, s["text"])
            distinct.add(s["text"])
            synth["texts"] += 1
            synth["true"] += ok
            synth["kept"] += bool(s["keep"])
            synth["kept_true"] += ok and bool(s["keep"])
            synth["removed_false"] += (not ok) and not s["keep"]
            synth_scores["true" if ok else "false"].append(float(s["score"]))
    noisy = sum(n for k, n in kinds.items() if k != "correct")
    removed_noisy = sum(n for k, n in removed.items() if k != "correct")
    removed_all = sum(removed.values())
    web_total = sum(kinds.values())
    synth_false = synth["texts"] - synth["true"]
    return {
        "threshold": threshold,
        "definition": FILTER_DEFINITION,
        "web": {
            "texts": web_total,
            "noisy": noisy,
            "removed": removed_all,
            "removed_noisy": removed_noisy,
            "precision": removed_noisy / removed_all if removed_all else 0.0,
            "recall": removed_noisy / noisy if noisy else 0.0,
            "kept_correct_rate": 1 - removed["correct"] / kinds["correct"] if kinds["correct"] else 0.0,
            "by_noise": {k: {"texts": kinds[k], "removed": removed[k]} for k in scores if kinds[k]},
            "partial_by_attribute": {a: {"texts": partial[a], "removed": partial_removed[a]} for a in sorted(partial)},
        },
        "synthetic": {
            "texts": synth["texts"],
            "true": synth["true"],
            "true_rate": synth["true"] / synth["texts"] if synth["texts"] else 0.0,
            "distinct_rate": len(distinct) / synth["texts"] if synth["texts"] else 0.0,  # diversity of the captions
            "kept": synth["kept"],
            "kept_true": synth["kept_true"],
            "kept_true_rate": synth["kept_true"] / synth["kept"] if synth["kept"] else 0.0,
            "precision": synth["removed_false"] / (synth["texts"] - synth["kept"])
            if synth["texts"] > synth["kept"]
            else 0.0,
            "recall": synth["removed_false"] / synth_false if synth_false else 0.0,
        },
        "scores": {"web": scores, "synthetic": synth_scores},
    }


def training_sets(clean_manifest: Path, capfilt_dataset: str, analysis: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """How many texts each pretraining run reads, and how many of them are false for their image."""
    clean = sum(len(row["captions"]) for row in read_jsonl(clean_manifest))
    web, synth = analysis["web"], analysis["synthetic"]
    kept_web = web["texts"] - web["removed"]
    kept_web_false = web["noisy"] - web["removed_noisy"]
    kept_synth_false = synth["kept"] - synth["kept_true"]
    bootstrapped = sum(1 for line in Path(capfilt_dataset).read_text().splitlines() if line.strip())
    return {
        "web": {
            "texts": web["texts"] + clean,
            "web": web["texts"],
            "synthetic": 0,
            "clean": clean,
            "web_false": web["noisy"],
            "false": web["noisy"],
            "false_rate": web["noisy"] / (web["texts"] + clean),
        },
        "capfilt": {
            "texts": bootstrapped,
            "web": kept_web,
            "synthetic": synth["kept"],
            "clean": clean,
            "web_false": kept_web_false,
            "false": kept_web_false + kept_synth_false,
            "false_rate": (kept_web_false + kept_synth_false) / max(1, bootstrapped),
        },
    }


def pick_examples(folder: Path, data_dir: Path, n: int) -> list[dict[str, Any]]:
    """A few web images of each noise kind (in input order) with their web and synthetic captions and verdicts."""
    from blip.capfilt import read_records
    from blip.data.shapes import NOISE_KINDS, Scene, caption_errors

    per_kind = max(1, n // len(NOISE_KINDS))
    chosen: dict[str, list[dict[str, Any]]] = {k: [] for k in NOISE_KINDS}
    for record in read_records(folder):
        noise = record.get("noise")
        if noise not in chosen or len(chosen[noise]) >= per_kind:
            continue
        scene = Scene.from_dict(record["scene"])
        synthetic = []
        for s in record["synthetic"]:
            errors = caption_errors(scene, s["text"])
            synthetic.append({**s, "errors": errors, "true": not errors})
        image = Path(record["image"])
        chosen[noise].append(
            {
                "id": record["id"],
                "image": str(image if image.is_absolute() else data_dir / image),
                "web_text": record["web_text"],
                "web_score": record["web_score"],
                "web_keep": record["web_keep"],
                "noise": noise,
                "noise_detail": record.get("noise_detail"),
                "synthetic": synthetic,
            }
        )
        if all(len(v) >= per_kind for v in chosen.values()):
            break
    return [row for k in NOISE_KINDS for row in chosen[k]]


def baselines(cfg: DemoConfig, data_dir: Path) -> dict[str, dict[str, float]]:
    """The same architecture untrained, and chance: a constant caption, the blind VQA answer, random retrieval."""
    from blip.api import Blip
    from blip.evaluation import caption_scores
    from blip.evaluation.run import caption_rows, evaluate
    from blip.train.modeling import build_model
    from blip.train.pipeline import blind_vqa_baseline

    untrained: dict[str, float] = {}
    tasks = (("caption", cfg.caption), ("vqa", cfg.vqa), ("retrieval", cfg.filter)) if cfg.untrained_baseline else ()
    for task, base in tasks:
        torch.manual_seed(cfg.seed)
        model, tokenizer = build_model(base.replace(init="", data=""))
        blip_model = Blip.from_model(model, tokenizer, batch_size=64)
        with torch.inference_mode():
            result = evaluate(
                blip_model,
                task,
                str(data_dir),
                max_images=cfg.n_test,
                prompt=base.prompt if task == "caption" else "",
                num_beams=base.eval_num_beams if task == "caption" else None,
                max_new_tokens=base.eval_max_new_tokens if task == "caption" else None,
                min_new_tokens=base.eval_min_new_tokens,
                k_test=cfg.k_test,
            )
        untrained.update(_headline(task, result.metrics))
    # Chance: the most common clean training caption for every test image; each question's most common training
    # answer; a random ranking (R@1 = 1 / number of test images, both ways).
    clean = [c for row in read_jsonl(data_dir / "clean.jsonl") for c in row["captions"]]
    constant = Counter(clean).most_common(1)[0][0]
    rows = caption_rows(str(data_dir), max_images=cfg.n_test)
    scores = caption_scores({i: r["captions"] for i, r in enumerate(rows)}, {i: constant for i in range(len(rows))})
    chance = {
        "cider": 100 * scores["cider"],
        "bleu4": 100 * scores["bleu4"],
        "vqa_accuracy": blind_vqa_baseline(str(data_dir), cfg.n_test),
        "retrieval_r1": 100.0 / len(rows),
        "tr_r1": 100.0 / len(rows),
        "ir_r1": 100.0 / len(rows),
    }
    return {"untrained": untrained, "chance": chance, "constant_caption": constant}


def _headline(task: str, m: dict[str, float]) -> dict[str, float]:
    """The demo's numbers from a task's test metrics (CIDEr and BLEU-4 on the papers' x100 scale)."""
    if task == "caption":
        return {"cider": 100 * m["cider"], "bleu4": 100 * m["bleu4"], "rouge_l": 100 * m["rouge_l"]}
    if task == "vqa":
        return {"vqa_accuracy": m["accuracy"]}
    return {
        "retrieval_r1": (m["tr_r1"] + m["ir_r1"]) / 2,
        "tr_r1": m["tr_r1"],
        "ir_r1": m["ir_r1"],
        "retrieval_r_mean": m["r_mean"],
    }


# ---------------------------------------------------------------------------------------------------------------------
# The whole story.


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`saved` with every key it lacks (at any depth) taken from `defaults`."""
    out = dict(saved)
    for key, default in defaults.items():
        if key not in out:
            out[key] = default
        elif isinstance(out[key], dict) and isinstance(default, dict):
            out[key] = _with_defaults(out[key], default)
    return out


_NOT_IDENTITY = ("threads", "processes")  # how a run uses the CPU, not what it computes


def run_demo(
    out: Path | str,
    *,
    config: DemoConfig | str | Path | None = None,
    seed: int | None = None,
    threads: int | None = None,
    processes: int | None = None,
    smoke: bool = False,
    ablations: bool = False,
    say: Callable[[str], None] = print_line,
) -> int:
    """Run (or resume) the demo into `out`; returns the exit code (0). `config`: a `DemoConfig`, a config file, or
    None for `configs/demo_shapes.py`; `seed`, `threads` and `processes` override the config's; `smoke` asks the file
    for toy sizes; `ablations` adds the paper's ablations (`blip.demo.ablations`, about 3x the demo's time). A folder
    holding a run of another config (threads and processes aside) is refused with `DemoConfigError`."""
    out = Path(out).resolve()  # every path a stage records is absolute, so the run works from any directory
    cfg = config if isinstance(config, DemoConfig) else load_demo_config(config, smoke=smoke)
    if seed is not None:
        cfg = cfg.replace(seed=seed)
    if threads is not None:
        cfg = cfg.replace(threads=threads)
    if processes is not None:
        cfg = cfg.replace(processes=processes)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "demo_config.json"
    identity = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k not in _NOT_IDENTITY}
    if saved.is_file():
        # a field added since that run was saved has its default there (new fields default to the old behaviour)
        before = _with_defaults(json.loads(saved.read_text()), json.loads(json.dumps(DemoConfig().to_dict())))
        if {k: v for k, v in before.items() if k not in _NOT_IDENTITY} != identity:
            raise DemoConfigError(f"{out} holds a demo run with another config; choose another --out or delete it")
    atomic_write_json(saved, cfg.to_dict())
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, say, ablations)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DemoConfig, out: Path, say: Callable[[str], None], ablations: bool = False) -> int:
    data_dir = out / "data"
    say(f"blip demo: CapFilt on the shapes world -> {out} (seed {cfg.seed}, {cfg.threads or 'default'} threads)")
    from blip.demo.ablations import stage_count

    added = 2 * (cfg.caption_finetunes - 1) + (stage_count(cfg) if ablations else 0)
    stages = Stages(total=10 + (cfg.vision is not None) + added, say=say)
    world = stages.run(
        "data",
        data_dir,
        f"generate {cfg.n_web} web + {cfg.n_clean} clean + {cfg.n_vqa} VQA + {cfg.n_test} test images",
        lambda: generate_world(cfg, data_dir),
    )
    base = stages.run("baselines", out / "baselines", "untrained models and chance", lambda: baselines(cfg, data_dir))
    vision = None
    if cfg.vision is not None:
        vision = stages.run(
            "vision",
            out / "vision",
            f"pretrain the ViT to name the shape under each patch and its place ({cfg.vision.steps} steps)",
            lambda: pretrain_vision_stage(cfg, out / "vision"),
        )
        cfg = cfg.replace(pretrain=cfg.pretrain.replace(vision_init=vision["path"]))  # every pretraining run below
    web_data = f"{data_dir / 'web.jsonl'},{pretraining_clean(cfg, data_dir)}"
    pre_web = stages.run(
        "pretrain_web",
        out / "web" / "pretrain",
        f"pretrain on web + clean captions ({cfg.pretrain.max_steps} steps)",
        lambda: pretrain(cfg, web_data, out / "web" / "pretrain", data_dir),
    )
    # after the web pretraining: the filter, the web arm's VQA fine-tune, the captioner (its first captioning
    # fine-tune) and its other captioning fine-tunes need nothing of each other (longest first: side by side, the
    # group ends sooner)
    side = side_by_side_config(cfg)
    web_captions = [
        Stage(
            "captioner",
            out / "web" / "caption",
            "fine-tune the captioner (LM on clean captions)",
            finetune,
            (side, cfg.caption, pre_web["checkpoint"], data_dir, out / "web" / "caption"),
        ),
        *caption_stages(side, "web", pre_web["checkpoint"], data_dir, out / "web", first=1),
    ]
    filter_stage = Stage(
        "filter",
        out / "filter",
        "fine-tune the filter (ITC + ITM on clean captions, written negatives), choose its threshold",
        train_filter,
        (side, pre_web["checkpoint"], data_dir, out / "filter"),
    )
    web_group = [filter_stage, vqa_stage(side, "web", pre_web["checkpoint"], data_dir, out / "web"), *web_captions]
    done = stages.run_side_by_side(web_group, cfg.processes)
    cap_web, filt = done["captioner"], done["filter"]
    capfilt = stages.run(
        "capfilt",
        out / "capfilt_data",
        "CapFilt: caption every web image, filter web and synthetic texts",
        lambda: run_capfilt_stage(cfg, cap_web["model"], filt["model"], filt, data_dir, out / "capfilt_data"),
    )
    pre_cf = stages.run(
        "pretrain_capfilt",
        out / "capfilt" / "pretrain",
        f"pretrain from scratch on the bootstrapped data ({cfg.pretrain.max_steps} steps)",
        lambda: pretrain(cfg, capfilt["dataset"], out / "capfilt" / "pretrain", data_dir),
    )
    cf_captions = caption_stages(side, "capfilt", pre_cf["checkpoint"], data_dir, out / "capfilt")
    cf_group = [vqa_stage(side, "capfilt", pre_cf["checkpoint"], data_dir, out / "capfilt"), *cf_captions]
    done.update(stages.run_side_by_side(cf_group, cfg.processes))
    results = {
        "web": {"pretrain": pre_web, "captions": [done[c.name] for c in web_captions], "vqa": done["vqa_web"]},
        "capfilt": {"pretrain": pre_cf, "captions": [done[c.name] for c in cf_captions], "vqa": done["vqa_capfilt"]},
    }
    analysis = analyse_capfilt(out / "capfilt_data", filt["threshold"])
    metrics: dict[str, Any] = {
        "seed": cfg.seed,
        "filter_precision": analysis["web"]["precision"],
        "filter_recall": analysis["web"]["recall"],
        "filter_definition": FILTER_DEFINITION,
    }
    for arm in ARMS:
        metrics[arm] = arm_result(results[arm])
    demo_seconds = stages.wall  # the demo's own stages, what `make demo` takes
    if ablations:
        from blip.demo.ablations import findings, run_ablations

        main = {"pre_web": pre_web, "cap_web": cap_web, "filter": filt, "pre_capfilt": pre_cf, "analysis": analysis}
        main["arms"] = {"web": metrics["web"], "capfilt": metrics["capfilt"]}
        metrics["ablations"] = run_ablations(cfg, out, stages, data_dir, main)  # by arm: a contract
        metrics["ablation_findings"] = findings(metrics["ablations"])
    metrics["vision"] = vision and {k: v for k, v in vision.items() if k != "path"}
    metrics["baselines"] = {"untrained": base["untrained"], "chance": base["chance"]}
    metrics["constant_caption"] = base["constant_caption"]
    metrics["filter"] = {k: v for k, v in analysis.items() if k != "scores"}
    metrics["filter"]["validation"] = filt["validation"]
    metrics["filter"]["itc_weight"] = filt["itc_weight"]
    metrics["filter_model"] = _headline("retrieval", filt["test"]["retrieval"])
    metrics["captioner"] = _headline("caption", cap_web["test"]["caption"])
    metrics["training_sets"] = training_sets(pretraining_clean(cfg, data_dir), capfilt["dataset"], analysis)
    metrics["capfilt_summary"] = {k: capfilt[k] for k in ("web_kept", "synthetic_kept", "clean_texts", "texts_out")}
    metrics["world"] = world
    metrics["timings"] = dict(stages.timings)
    metrics["total_seconds"] = stages.wall
    metrics["demo_seconds"] = demo_seconds
    metrics["cpu_seconds"] = dict(stages.cpu)
    metrics["load_average"] = _load_average()
    metrics["threads"] = cfg.threads  # this invocation's; a resumed run's stages may have run with others
    metrics["processes"] = cfg.processes
    metrics["stage_threads"] = dict(stages.threads)
    metrics["config"] = cfg.to_dict()
    atomic_write_json(out / "metrics.json", metrics)
    examples = pick_examples(out / "capfilt_data", data_dir, cfg.examples)
    report = write_report(out, metrics, analysis["scores"], examples)
    say(summary_text(metrics))
    say(f"report: {report}   metrics: {out / 'metrics.json'}")
    return 0


def side_by_side_config(cfg: DemoConfig) -> DemoConfig:
    """The config a side-by-side stage runs with: one torch thread when `processes` > 1 (training sets its threads
    from the config, so the worker's own setting would not hold)."""
    return cfg.replace(threads=1) if cfg.processes > 1 else cfg


def caption_stages(cfg: DemoConfig, name: str, init: str, data_dir: Path, folder: Path, first: int = 0) -> list[Stage]:
    """An arm's captioning fine-tunes `first`.. of `cfg.caption_finetunes` from `init`: the first in `folder/caption`
    with the demo's seed (stage `caption_<name>`), fine-tune k (from 2) in `folder/caption_<k>` with seed
    `seed + 1000 (k - 1)` (stage `caption_<name>_<k>`)."""
    out = []
    for k in range(first, cfg.caption_finetunes):
        seed = cfg.seed + 1000 * k
        if k == 0:
            where, name_k, what = folder / "caption", f"caption_{name}", f"fine-tune the {name} model for captioning"
        else:
            where, name_k = folder / f"caption_{k + 1}", f"caption_{name}_{k + 1}"
            what = f"fine-tune the {name} model for captioning (fine-tune {k + 1}, seed {seed})"
        out.append(Stage(name_k, where, what, finetune, (cfg, cfg.caption, init, data_dir, where, "", seed)))
    return out


def vqa_stage(cfg: DemoConfig, name: str, init: str, data_dir: Path, folder: Path) -> Stage:
    """An arm's VQA fine-tune from `init`, in `folder/vqa` (stage `vqa_<name>`)."""
    return Stage(
        f"vqa_{name}",
        folder / "vqa",
        f"fine-tune the {name} model for VQA",
        finetune,
        (cfg, cfg.vqa, init, data_dir, folder / "vqa"),
    )


def train_arm(cfg: DemoConfig, stages: Stages, name: str, data: str, folder: Path, data_dir: Path) -> dict[str, Any]:
    """One arm of a comparison: pretrain from scratch on `data`, then its captioning fine-tunes and VQA fine-tune
    (side by side with `cfg.processes`): `{"pretrain": ..., "captions": [...], "vqa": ...}`."""
    pre = stages.run(
        f"pretrain_{name}",
        folder / "pretrain",
        f"pretrain from scratch on the {name} data ({cfg.pretrain.max_steps} steps)",
        lambda: pretrain(cfg, data, folder / "pretrain", data_dir),
    )
    side = side_by_side_config(cfg)
    captions = caption_stages(side, name, pre["checkpoint"], data_dir, folder)
    done = stages.run_side_by_side(
        [vqa_stage(side, name, pre["checkpoint"], data_dir, folder), *captions], cfg.processes
    )
    return {"pretrain": pre, "captions": [done[stage.name] for stage in captions], "vqa": done[f"vqa_{name}"]}


def arm_result(results: dict[str, Any]) -> dict[str, Any]:
    """An arm's headline numbers (CIDEr, BLEU-4 and ROUGE-L: the mean of its captioning fine-tunes, each one's in
    `caption_finetunes`; VQA accuracy; zero-shot R@1) and its pretraining run."""
    pre = results["pretrain"]
    draws = [_headline("caption", r["test"]["caption"]) for r in results["captions"]]
    return {
        **{key: sum(d[key] for d in draws) / len(draws) for key in draws[0]},
        "caption_finetunes": draws,
        **_headline("vqa", results["vqa"]["test"]["vqa"]),
        **_headline("retrieval", pre["test"]["retrieval"]),
        "pretrain_pairs": pre["pairs"],
        "pretrain_epochs": pre["epochs"],
        "pretrain_losses": pre["losses"],
    }


def _load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages at the end of the run (timings depend on them)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def summary_text(m: dict[str, Any]) -> str:
    """A few lines for the terminal: the filter, the data, and the two models side by side."""
    sets = m["training_sets"]
    lines = [
        f"filter on web captions: precision {100 * m['filter_precision']:.1f}%  recall {100 * m['filter_recall']:.1f}%"
        f"  (positive = noisy caption, removed)",
        f"false texts in pretraining data: web {100 * sets['web']['false_rate']:.1f}% of {sets['web']['texts']}"
        f" -> capfilt {100 * sets['capfilt']['false_rate']:.1f}% of {sets['capfilt']['texts']}",
        f"{'':14s}{'web':>9s}{'capfilt':>9s}{'chance':>9s}",
    ]
    for key, name in (
        ("cider", "CIDEr"),
        ("bleu4", "BLEU-4"),
        ("vqa_accuracy", "VQA acc"),
        ("retrieval_r1", "zs R@1"),
    ):
        chance = m["baselines"]["chance"][key]
        lines.append(f"{name:14s}{m['web'][key]:9.1f}{m['capfilt'][key]:9.1f}{chance:9.1f}")
    draws = len(m["web"].get("caption_finetunes", [None]))
    if draws > 1:
        lines.append(f"CIDEr, BLEU-4: the mean of {draws} captioning fine-tunes per arm, each with its own seed")
    side = f", fine-tunes {m['processes']} side by side" if m.get("processes", 1) > 1 else ""
    lines.append(f"total {m['total_seconds'] / 60:.1f} min on {m['threads'] or 'default'} threads{side}")
    return "\n".join(lines)
