"""A training run from a `TrainConfig`: data, model, task, optimizer, the loop, then export and evaluation.

run(cfg)  ->  out_dir/
    config.json           the resolved TrainConfig
    checkpoint.pt         self-describing, resumable (see blip.weights.checkpoint)
    metrics.jsonl         rank-averaged losses every log_every steps
    loss.png              training curves
    model/                the trained caption / vqa / retrieval model as a Hugging Face folder
    eval_<task>.json      test metrics (+ _predictions.jsonl, PNGs) when eval_data is set
    summary.json          what happened: steps, time, skipped rows, final losses, test metrics
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from blip import distributed as D
from blip.api import Blip
from blip.config import SAVED_ARCHITECTURES
from blip.data.manifests import DataError, SkipLog, read_pairs, read_questions, resolve_sources
from blip.tokenizer import BlipTokenizer
from blip.train.collate import PairCollator, QuestionCollator, prompt_length
from blip.train.config import TrainConfig
from blip.train.datasets import GlobalBatchSampler, PairDataset, QuestionDataset, TarPairStream, count_tar_samples
from blip.train.loop import LoopSettings, Trainer, total_steps
from blip.train.modeling import build_model
from blip.train.objectives import CaptionTask, PretrainTask, RetrievalTask, TrainTask, VqaTask
from blip.train.optim import LRSchedule, build_optimizer
from blip.train.rng import seed_everything
from blip.weights.checkpoint import config_to_dict, tokenizer_to_dict

_logger = logging.getLogger(__name__)


class ImageFunction:
    """PIL image + per-sample RNG -> `[3, S, S]`: training augmentation, or evaluation preprocessing."""

    def __init__(self, cfg: TrainConfig, image_size: int):
        from blip.transforms import ImageTransform, TrainTransform

        self.augment = cfg.augment
        if cfg.augment:
            self.transform = TrainTransform(
                image_size, scale=cfg.crop_scale, hflip=cfg.hflip, randaugment=cfg.randaugment
            )
        else:
            self.transform = ImageTransform(image_size)

    def __call__(self, image, rng) -> torch.Tensor:
        return self.transform([image], rng)[0] if self.augment else self.transform([image])[0]


class MapData:
    """A map-style dataset read by per-rank micro-batches of a `GlobalBatchSampler`."""

    def __init__(
        self, dataset, collate, sampler: GlobalBatchSampler, *, num_workers: int = 0, seed: int = 0, pin: bool = False
    ):
        self.dataset, self.collate, self.sampler = dataset, collate, sampler
        self.num_workers, self.seed, self.pin = num_workers, seed, pin
        self.micro_batches_per_epoch = sampler.num_batches

    def batches(self, epoch: int, start: int):
        self.sampler.set_epoch(epoch, start)
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin,
            generator=torch.Generator().manual_seed(self.seed),  # keeps the global RNG untouched (exact resume)
        )
        return iter(loader)


class StreamData:
    """WebDataset shards streamed endlessly; an epoch is `samples // global batch` micro-batches."""

    def __init__(self, stream: TarPairStream, collate, *, samples: int, batch_size: int, world_size: int, workers: int):
        self.stream, self.collate, self.batch_size, self.workers = stream, collate, batch_size, workers
        self.micro_batches_per_epoch = samples // (batch_size * world_size)

    def batches(self, epoch: int, start: int):
        self.stream.set_position(epoch, start)
        loader = DataLoader(
            self.stream,
            batch_size=self.batch_size,
            collate_fn=self.collate,
            num_workers=self.workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(0),
        )
        return iter(loader)


def ensure_shapes(cfg: TrainConfig) -> None:
    """Generate the shapes world (task nlvr: its image pairs) into `cfg.data` unless a complete one is there."""
    from blip.data import shapes

    folder = Path(cfg.data.split(",")[0])
    folder = folder.parent if folder.suffix else folder  # a manifest path: its folder
    if cfg.task == "nlvr":
        from blip.data.shapes.nlvr import generate_nlvr

        meta = folder / "nlvr_meta.json"
        if not (meta.is_file() and json.loads(meta.read_text()).get("complete")):
            _logger.info("generating the shapes-world NLVR pairs in %s", folder)
            n_train, n_test = cfg.nlvr_counts
            generate_nlvr(folder, seed=cfg.shapes_seed, n_train=n_train, n_test=n_test)
        return
    meta = folder / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("complete"):
        return
    clean, web, vqa, test = cfg.shapes_counts
    _logger.info("generating the shapes world in %s", folder)
    shapes.generate(folder, seed=cfg.shapes_seed, n_clean=clean, n_web=web, n_vqa=vqa, n_test=test, progress=True)


def build_nlvr_data(cfg: TrainConfig, tokenizer: BlipTokenizer, image_size: int, enc_token_id: int, dist: D.DistInfo):
    from blip.data.nlvr import nlvr_source, read_nlvr_pairs
    from blip.train.nlvr import NlvrCollator, NlvrDataset

    source = nlvr_source(cfg.data, cfg.data_split or "train")
    rows = read_nlvr_pairs(source, cfg.image_root)[: cfg.max_samples or None]
    dataset = NlvrDataset(rows, ImageFunction(cfg, image_size), cfg.seed, swap=cfg.nlvr_swap)
    collate = NlvrCollator(tokenizer, enc_token_id, cfg.max_text_len)
    sampler = GlobalBatchSampler(
        len(dataset), cfg.batch_size, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed
    )
    if sampler.num_batches == 0:
        raise DataError(f"{len(dataset)} NLVR pairs are fewer than one global batch")
    _logger.info("training on %d image pairs from %s", len(dataset), source)
    pin = dist.device.type == "cuda"
    data = MapData(dataset, collate, sampler, num_workers=cfg.num_workers, seed=cfg.seed, pin=pin)
    return data, dataset.skips


def _cache_bytes(cfg: TrainConfig) -> int:
    """Room for preprocessed images in memory: none when augmentation draws new pixels every epoch, or when loader
    workers (started afresh each epoch) would fill copies of the cache only to drop them."""
    return 0 if cfg.augment or cfg.num_workers else cfg.image_cache_mb * 2**20


def build_data(cfg: TrainConfig, tokenizer: BlipTokenizer, image_size: int, dist: D.DistInfo) -> tuple[Any, SkipLog]:
    skips = SkipLog()
    sources = resolve_sources(cfg.data, cfg.task, cfg.data_split)
    image_fn = ImageFunction(cfg, image_size)
    read_kw = {"image_root": cfg.image_root, "image_column": cfg.image_column, "skips": skips}
    shards = [s for s in sources if s.endswith(".tar")]
    if cfg.task == "vqa":
        if shards:
            raise DataError("VQA training reads question manifests, not tar shards")
        rows = []
        for source in sources:
            rows += read_questions(source, image_template=cfg.image_template, **read_kw)
        for q in rows:
            if not q.answers:
                skips.skip("no answers", str(q.question_id))
        rows = [q for q in rows if q.answers]
        dataset = QuestionDataset(rows[: cfg.max_samples or None], image_fn, cfg.seed, _cache_bytes(cfg))
        collate = QuestionCollator(tokenizer, cfg.max_text_len, cfg.max_answer_len)
    else:
        prompt = cfg.prompt if cfg.task == "caption" else ""
        collate = PairCollator(tokenizer, cfg.max_text_len, prompt)
        if shards:
            if len(shards) != len(sources):
                raise DataError("mix of tar shards and manifests: train on one kind of source")
            stream = TarPairStream(
                shards, image_fn, batch_size=cfg.batch_size, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed
            )
            samples = sum(count_tar_samples(shards))
            if cfg.max_samples:
                samples = min(samples, cfg.max_samples)
            data = StreamData(
                stream,
                collate,
                samples=samples,
                batch_size=cfg.batch_size,
                world_size=dist.world_size,
                workers=cfg.num_workers,
            )
            skips.report("training data")
            return data, stream.skips
        rows = read_pairs(sources, text_column=cfg.text_column, split=cfg.data_split, **read_kw)
        dataset = PairDataset(
            rows[: cfg.max_samples or None],
            image_fn,
            cfg.seed,
            negatives=cfg.written_negatives,
            cache_bytes=_cache_bytes(cfg),
        )
    skips.report("training data")
    sampler = GlobalBatchSampler(
        len(dataset), cfg.batch_size, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed
    )
    if sampler.num_batches == 0:
        raise DataError(
            f"{len(dataset)} training rows are fewer than one global batch "
            f"({cfg.batch_size} x {dist.world_size} processes)"
        )
    _logger.info("training on %d rows (%d skipped) from %s", len(dataset), skips.total, ", ".join(sources))
    pin = dist.device.type == "cuda"
    return MapData(dataset, collate, sampler, num_workers=cfg.num_workers, seed=cfg.seed, pin=pin), skips


def build_task(cfg: TrainConfig, model, tokenizer: BlipTokenizer, steps_per_epoch: int) -> TrainTask:
    itm_token = model.config.enc_token_id if cfg.itm_token == "enc" else None
    ramp = int(round(cfg.alpha_ramp_epochs * steps_per_epoch))
    contrastive = {
        "queue_size": cfg.queue_size,
        "momentum": cfg.momentum,
        "alpha": cfg.alpha,
        "alpha_ramp_steps": ramp,
        "temp": cfg.temp,
        "itm_token_id": itm_token,
        "negatives_all_ranks": cfg.negatives_all_ranks,
        "seed": cfg.seed,
    }
    if cfg.task == "pretrain":
        return PretrainTask(model, label_smoothing=cfg.label_smoothing, **contrastive)
    if cfg.task == "nlvr":
        from blip.train.nlvr import NlvrTask

        return NlvrTask(model)
    if cfg.task == "retrieval":
        return RetrievalTask(model, **contrastive)
    if cfg.task == "caption":
        return CaptionTask(
            model, prompt_length=prompt_length(tokenizer, cfg.prompt), label_smoothing=cfg.label_smoothing
        )
    return VqaTask(model, question_token_id=itm_token, label_smoothing=cfg.label_smoothing)


@dataclass
class RunSummary:
    finished: bool
    step: int
    total_steps: int
    seconds: float
    losses: dict[str, float]
    skipped: dict[str, int]
    evaluation: dict[str, dict[str, float]]
    out_dir: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def evaluate_trained(blip_model, cfg: TrainConfig, out: Path) -> dict[str, dict[str, float]]:
    """Test metrics of the trained model (pretrain: zero-shot retrieval and unprompted captioning)."""
    from blip.evaluation.run import evaluate, write_result

    tasks = ["retrieval", "caption"] if cfg.task == "pretrain" else [cfg.task]
    results = {}
    for task in tasks:
        result = evaluate(
            blip_model,
            task,
            cfg.eval_data,
            split=cfg.eval_split,
            max_images=cfg.eval_max_images,
            prompt=cfg.prompt if cfg.task == "caption" else "",
            num_beams=cfg.eval_num_beams if task == "caption" else None,
            max_new_tokens=cfg.eval_max_new_tokens if task == "caption" else None,
            min_new_tokens=cfg.eval_min_new_tokens,
            vqa_mode=cfg.eval_vqa_mode,
            k_test=cfg.eval_k_test,
        )
        write_result(result, out)
        results[task] = result.metrics
        _logger.info("%s test metrics: %s", task, json.dumps(result.metrics))
    return results


def run(cfg: TrainConfig) -> RunSummary:
    """Train (or resume) as `cfg` says; with torchrun, every rank calls this."""
    dist = D.init_distributed_device(cfg.device)
    threads = torch.get_num_threads()
    try:
        return _run(cfg, dist)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, notebooks) get their setting back
        D.cleanup()


def _run(cfg: TrainConfig, dist: D.DistInfo) -> RunSummary:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    out = Path(cfg.out_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if cfg.make_shapes:
            ensure_shapes(cfg)
    D.barrier()

    seed_everything(cfg.seed)  # the same on every rank: model init, queues
    model, tokenizer = build_model(cfg)
    if cfg.task == "nlvr":
        data, skips = build_nlvr_data(cfg, tokenizer, model.config.vision.image_size, model.config.enc_token_id, dist)
    else:
        data, skips = build_data(cfg, tokenizer, model.config.vision.image_size, dist)
    steps_per_epoch = data.micro_batches_per_epoch // cfg.grad_accum
    steps = total_steps(cfg.epochs, steps_per_epoch, cfg.max_steps)
    task = build_task(cfg, model, tokenizer, steps_per_epoch).to(dist.device)
    optimizer = build_optimizer(task, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, decay_1d=cfg.decay_1d)
    schedule = LRSchedule(cfg.lr, steps, cfg.warmup_steps, cfg.warmup_lr, cfg.min_lr, cfg.schedule)
    seed_everything(cfg.seed + dist.rank)
    describe = {
        "task": cfg.task,
        "model_config": config_to_dict(model.config),
        "tokenizer": tokenizer_to_dict(tokenizer),
        "train_config": cfg.to_dict(),
    }
    settings = LoopSettings(
        total_steps=steps,
        grad_accum=cfg.grad_accum,
        clip_grad=cfg.clip_grad,
        amp=cfg.amp,
        log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every,
        ckpt_every_s=cfg.ckpt_every_s,
        stop_after=cfg.stop_after,
        resume=cfg.resume,
        desc=cfg.label or cfg.task,
        compile=cfg.compile,
    )
    trainer = Trainer(task, optimizer, schedule, data, settings, out_dir=out, dist=dist, describe=describe)
    _logger.info(
        "%s: %d steps (%d per epoch), global batch %d, %d process(es), %.2fM parameters",
        cfg.task,
        steps,
        steps_per_epoch,
        cfg.batch_size * cfg.grad_accum * dist.world_size,
        dist.world_size,
        model.num_parameters() / 1e6,
    )
    trainer.maybe_resume()
    result = trainer.fit()
    evaluation: dict[str, dict[str, float]] = {}
    if result.finished and dist.is_main:
        evaluation = _finish(cfg, task.model, tokenizer, out)
    summary = RunSummary(
        finished=result.finished,
        step=result.state.step,
        total_steps=steps,
        seconds=result.seconds,
        losses=result.state.metrics,
        skipped=skips.summary(),
        evaluation=evaluation,
        out_dir=str(out),
    )
    if dist.is_main:
        (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary  # no barrier: the other ranks need not wait (past any timeout) for rank 0's evaluation


def _finish(cfg: TrainConfig, model, tokenizer: BlipTokenizer, out: Path) -> dict[str, dict[str, float]]:
    from blip.train.plots import plot_training_curves

    plot_training_curves(out / "metrics.jsonl", out / "loss.png")
    blip_model = Blip.from_model(model, tokenizer, source=str(out / "checkpoint.pt"))
    if cfg.save_hf and model.config.kind in SAVED_ARCHITECTURES:
        blip_model.save(out / "model")
        _logger.info("saved the trained %s model (Hugging Face layout) in %s", model.config.kind, out / "model")
    if not cfg.eval_data:
        return {}
    with torch.inference_mode():
        return evaluate_trained(blip_model, cfg, out)
