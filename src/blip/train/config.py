"""Run configuration: one validated dataclass, config files as code, typed `key=value` overrides.

A config file is a Python module defining `get_config(smoke: bool = False) -> TrainConfig` (see `configs/`). The
command line names it and overrides fields:

    blip train --config configs/caption_shapes.py lr=2e-4 batch_size=16 smoke=true

Each override is parsed against the field's type (bool, int, float, str, tuples as `a,b`, choices for Literal
fields); unknown keys and bad values are errors that say what is expected. `smoke=true` is handed to `get_config`
so the file can shrink everything for a quick local run.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

TaskName = Literal["pretrain", "caption", "vqa", "retrieval", "nlvr"]
TASK_KIND: dict[str, str] = {
    "pretrain": "pretrain",
    "caption": "caption",
    "vqa": "vqa",
    "retrieval": "retrieval",
    "nlvr": "nlvr",
}


class ConfigError(ValueError):
    """A bad config file, override key or value; the message says what was expected."""


# The shapes-world recipes (configs/*_shapes.py) share one tiny from-scratch model and one smoke size.
SHAPES_MODEL: dict[str, Any] = dict(
    image_size=64,
    patch_size=8,
    vision_width=128,
    vision_layers=3,
    vision_heads=4,
    text_width=128,
    text_layers=2,
    text_heads=4,
    embed_dim=64,
    init_std=0.1,  # BERT's 0.02 learns very slowly at width 128 from scratch
    pos_init="sincos",  # a normal table of std 0.1 stays there: the image tokens would hardly know where they are
    # the shapes world says left/right and names colours: no flips, no colour-changing augmentation
    augment=False,
    hflip=False,
    randaugment=False,
)
SHAPES_SMOKE: dict[str, Any] = dict(
    shapes_counts=(32, 64, 32, 8),
    data="runs/smoke/shapes",
    eval_data="runs/smoke/shapes",
    image_size=32,
    vision_width=64,
    vision_layers=2,
    text_width=64,
    embed_dim=32,
    batch_size=8,
    max_steps=6,
    log_every=2,
    eval_max_images=8,
)


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train ---------------------------------------------------------------------------------------------
    task: TaskName = "pretrain"
    out_dir: str = "runs/train"  # checkpoint.pt, metrics.jsonl, config.json, model/ (HF folder), plots
    # --- data ------------------------------------------------------------------------------------------------------
    data: str = ""  # folder (shapes world / dataset root), .jsonl/.csv manifest, Karpathy/COCO/VQA .json, .tar shards;
    # several comma-separated
    data_split: str = ""  # manifest inside a folder ("web", "clean", "vqa", ...) or Karpathy split; "" = task default
    image_root: str = ""  # base of relative image paths ("" = the manifest's folder)
    image_column: str = "image"  # manifest column holding the image path
    text_column: str = "caption"  # manifest column holding the caption(s) ("caption", "captions" and "text" are tried)
    max_samples: int = 0  # use at most this many training rows (0 = all)
    make_shapes: bool = False  # generate the shapes world into `data` first when it is not there
    shapes_counts: tuple[int, int, int, int] = (2000, 20000, 2000, 500)  # clean, web, vqa, test images
    shapes_seed: int = 0
    nlvr_counts: tuple[int, int] = (2000, 400)  # task nlvr with make_shapes: shapes-world pairs, train and test
    nlvr_swap: bool = True  # task nlvr: swap the images and the words left/right with p = 0.5 (the original)
    eval_data: str = ""  # dataset folder evaluated at the end of training ("" = no evaluation)
    eval_split: str = "test"
    eval_max_images: int = 0  # evaluate on at most this many test images (0 = all)
    eval_num_beams: int = 3  # captioning: beam width (VQA generation is greedy)
    eval_min_new_tokens: int = 5
    eval_max_new_tokens: int = 20
    eval_k_test: int = 16  # retrieval: candidates re-ranked with ITM per query
    eval_vqa_mode: Literal["generate", "rank"] = "generate"
    image_template: str = ""  # VQAv2 questions: image path from id, e.g. "val2014/COCO_val2014_{image_id:012d}.jpg"
    # --- model -----------------------------------------------------------------------------------------------------
    init: str = ""  # start from a training checkpoint (.pt), HF folder, .pth or hub id; "" = random init
    preset: str = "blip_test"  # architecture for random init (blip.config presets)
    vocab: str = "shapes"  # tokenizer for random init: "shapes", or a folder / vocab.txt / tokenizer.json
    image_size: int = 0  # 0 = the preset's (or the init checkpoint's)
    patch_size: int = 0
    vision_width: int = 0
    vision_layers: int = 0
    vision_heads: int = 0
    text_width: int = 0
    text_layers: int = 0
    text_heads: int = 0
    embed_dim: int = 0
    init_std: float = 0.02  # random init: truncated-normal std (BERT/ViT use 0.02; tiny models learn faster wider)
    pos_init: Literal["normal", "sincos"] = "normal"  # random init of the ViT position table (blip.models.init)
    # random init: start the image encoder from this checkpoint's (a timm/DeiT ViT .pth/.safetensors as the paper's
    # ImageNet ViT, any checkpoint blip.load reads, or a hub id); its position table resized to this run's grid
    vision_init: str = ""
    dropout: float = 0.0  # text hidden and attention dropout
    drop_path: float = 0.0  # ViT stochastic depth
    share_text_layers: bool = True  # pretrain: decoder shares all but self-attention with the encoder (the paper)
    grad_checkpointing: bool = False  # ViT gradient checkpointing
    # --- objectives ------------------------------------------------------------------------------------------------
    max_text_len: int = 30  # tokens per caption/question ([CLS] and [SEP] included)
    max_answer_len: int = 10
    prompt: str = "a picture of "  # caption fine-tuning and evaluation prompt
    queue_size: int = 57600
    momentum: float = 0.995
    alpha: float = 0.4  # momentum-distillation weight
    alpha_ramp_epochs: float = 2.0  # alpha rises linearly from 0 over this many epochs (retrieval: 1)
    temp: float = 0.07  # initial ITC temperature (learned, clamped to [0.001, 0.5])
    label_smoothing: float = 0.1
    itm_token: Literal["cls", "enc"] = "cls"  # start token of the image-grounded encoder (ITM and VQA questions)
    negatives_all_ranks: bool = True  # ITM hard negatives from the global batch
    written_negatives: int = 1  # ITM negatives per sample from the data's `negatives` column (when a row has some)
    # --- optimisation ----------------------------------------------------------------------------------------------
    epochs: int = 1
    max_steps: int = 0  # optimizer steps in all (0 = epochs x steps per epoch; epochs repeat as needed)
    stop_after: int = 0  # stop (checkpointed, resumable) once this many steps are done, as if interrupted
    batch_size: int = 32  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup_lr: float = 1e-6  # lr at step 0 of the warmup
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.05
    decay_1d: bool = True  # also decay biases / LayerNorm / temperature (the original does; LAVIS does not)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 0.0  # max gradient norm (0 = no clipping)
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto = bf16 on CUDA, none on CPU
    compile: bool = False  # torch.compile the training forward (same results; faster GPU steps after a compile)
    # --- images ----------------------------------------------------------------------------------------------------
    augment: bool = True  # RandomResizedCrop (+ flip, RandAugment as set below); off = evaluation preprocessing
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True  # off for data whose text says left/right (the shapes world)
    randaugment: bool = True
    # Without augmentation an image's pixels are the same every epoch: keep up to this many MiB of them in memory
    # rather than decode them again (0 = off; num_workers=0 only, as workers start afresh each epoch)
    image_cache_mb: int = 1024
    # --- bookkeeping -----------------------------------------------------------------------------------------------
    seed: int = 42
    deterministic: bool = False  # torch.use_deterministic_algorithms (CPU runs are exactly reproducible anyway)
    device: str = "auto"  # auto, cpu, cuda
    num_workers: int = 0
    threads: int = 0  # torch CPU threads per process (0 = torch's default)
    log_every: int = 10  # steps between metrics.jsonl rows
    ckpt_every: int = 0  # steps between checkpoints (0 = at the end of every epoch only)
    ckpt_every_s: float = 30.0  # also checkpoint once this many seconds passed (0 = off): a kill loses less than that
    # (the interval grows to 20x the time one checkpoint takes to write, for models whose checkpoints are large)
    label: str = ""  # the progress bar's label ("" = the task)
    resume: bool = True  # continue from out_dir/checkpoint.pt when it exists
    save_hf: bool = True  # write out_dir/model as a Hugging Face folder (caption / vqa / retrieval)
    smoke: bool = False  # set by `smoke=true`: the config file shrank the run
    notes: str = ""

    def __post_init__(self) -> None:
        errors = []
        if self.task not in TASK_KIND:
            errors.append(f"task must be one of {', '.join(TASK_KIND)}, got {self.task!r}")
        positive = ("batch_size", "grad_accum", "epochs", "max_text_len", "max_answer_len", "queue_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = (
            "max_steps",
            "stop_after",
            "warmup_steps",
            "max_samples",
            "ckpt_every",
            "num_workers",
            "threads",
            "written_negatives",
            "image_cache_mb",
        )
        for name in non_negative + ("eval_max_images", "image_size", "patch_size"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.ckpt_every_s >= 0:
            errors.append(f"ckpt_every_s must be >= 0, got {self.ckpt_every_s}")
        if self.lr <= 0:
            errors.append(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum <= 1.0:
            errors.append(f"momentum must be in [0, 1], got {self.momentum}")
        if not 0.0 <= self.alpha <= 1.0:
            errors.append(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.001 <= self.temp <= 0.5:
            errors.append(f"temp must be in [0.001, 0.5], got {self.temp}")
        if not 0.0 <= self.label_smoothing < 1.0:
            errors.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            errors.append(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.init_std <= 0:
            errors.append(f"init_std must be > 0, got {self.init_std}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.drop_path < 1.0:
            errors.append("dropout and drop_path must be in [0, 1)")
        if self.vision_init and self.init:
            errors.append("vision_init starts a random-init model's image encoder; init= already sets every weight")
        if self.make_shapes and not self.data:
            errors.append("make_shapes needs data=<folder> to write the shapes world into")
        if errors:
            raise ConfigError("invalid training config: " + "; ".join(errors))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @property
    def model_kind(self) -> str:
        return TASK_KIND[self.task]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """From `to_dict` output (e.g. a checkpoint); unknown keys are ignored, lists become tuples."""
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                if _origin(hints[f.name]) is tuple and isinstance(value, list):
                    value = tuple(value)
                values[f.name] = value
        return cls(**values)


# --- overrides ---------------------------------------------------------------------------------------------------


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _parse_value(key: str, text: str, tp: Any) -> Any:
    origin = _origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null", "") and len(options) < len(typing.get_args(tp)):
            return None
        return _parse_value(key, text, options[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if text not in choices:
            raise ConfigError(f"{key}={text!r}: expected one of {', '.join(map(str, choices))}")
        return text
    if origin is tuple:
        args = typing.get_args(tp)
        parts = [p.strip() for p in text.strip("()[] ").split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_value(key, p, args[0]) for p in parts)
        if len(parts) != len(args):
            names = ", ".join(getattr(a, "__name__", str(a)) for a in args)
            raise ConfigError(f"{key}={text!r}: expected {len(args)} comma-separated values ({names})")
        return tuple(_parse_value(key, p, a) for p, a in zip(parts, args))
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if tp is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    if tp is str:
        return text
    raise ConfigError(f"{key}: fields of type {tp} cannot be set from the command line")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["a=1", "b=x"]` -> `{"a": "1", "b": "x"}`; a later key wins."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise ConfigError(f"override {item!r} has no key")
        out[key] = value
    return out


def apply_overrides(cfg: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """Set fields from strings, each parsed against its declared type; the result is validated."""
    hints = typing.get_type_hints(TrainConfig)
    changes = {}
    for key, text in overrides.items():
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        changes[key] = _parse_value(key, text, hints[key])
    return cfg.replace(**changes) if changes else cfg


def load_config_file(path: str | Path, smoke: bool = False) -> TrainConfig:
    """Import a config module (by path) and call its `get_config(smoke=...)`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"blip_run_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"config file {path} failed to import: {type(e).__name__}: {e}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file {path} defines no get_config(smoke=False) -> TrainConfig")
    cfg = get_config(smoke=smoke)
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"{path}: get_config returned {type(cfg).__name__}, expected TrainConfig")
    return cfg.replace(smoke=smoke) if smoke else cfg


def resolve_config(config_path: str | None, overrides: list[str]) -> TrainConfig:
    """The run config: the file's `get_config` (or the defaults) with the overrides applied."""
    parsed = parse_overrides(overrides)
    smoke = _parse_value("smoke", parsed.pop("smoke"), bool) if "smoke" in parsed else False
    cfg = load_config_file(config_path, smoke=smoke) if config_path else TrainConfig(smoke=smoke)
    return apply_overrides(cfg, parsed)
