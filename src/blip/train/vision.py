"""Supervised pretraining of the image encoder alone, before BLIP's pretraining.

The paper never trains BLIP's ViT from nothing: it starts from an ImageNet classifier (DeiT / ViT, §4.1). A user with
such a checkpoint passes it as `TrainConfig.vision_init`; a world without one (the shapes world, whose stand-in for
ImageNet is `blip.data.shapes.labelled_scenes`: what shape lies under each patch, and where) trains one here: the run's
own ViT with a linear head per label, on its CLS token for labels of the image (`[N, L]`) or on every patch token for
labels of the patches (`[N, T, L]`), the losses summed; AdamW with warmup and a cosine schedule, then
`vision.safetensors` (`vision_model.*` keys) for `vision_init`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from blip.train.config import TrainConfig

WEIGHTS_FILE = "vision.safetensors"


@dataclass(frozen=True)
class VisionPretrainConfig:
    """How long and how fast the image encoder learns its labels."""

    images: int = 4000  # labelled training images
    eval_images: int = 500  # held-out images the reported accuracy is measured on
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05

    def __post_init__(self) -> None:
        for name in ("images", "eval_images", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"vision pretraining: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("vision pretraining: lr must be > 0, warmup_steps and weight_decay >= 0")


class _Classifier(nn.Module):
    """The ViT and one linear head per label, after the final LayerNorm: on the CLS token, or with `patches` on every
    patch token."""

    def __init__(self, vision: nn.Module, classes: dict[str, int], patches: bool = False):
        super().__init__()
        self.vision, self.patches = vision, patches
        self.heads = nn.ModuleList(nn.Linear(vision.config.hidden_size, n) for n in classes.values())

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.vision(pixels)
        x = tokens[:, 1:] if self.patches else tokens[:, 0]
        return [head(x) for head in self.heads]  # per label: [B, classes] or [B, T, classes]

    def loss(self, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self(pixels)
        return sum(F.cross_entropy(x.flatten(0, -2), labels[..., i].flatten()) for i, x in enumerate(logits))  # type: ignore[return-value]


def _lr(cfg: VisionPretrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


@torch.no_grad()
def _accuracy(model: _Classifier, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> list[float]:
    """Per label, the share of images (patch labels: of patches whose class is not 0, "nothing there") whose class
    is the head's argmax."""
    model.eval()
    right, total = torch.zeros(labels.shape[-1]), torch.zeros(labels.shape[-1])
    for i in range(0, len(labels), batch_size):
        for j, logits in enumerate(model(pixels[i : i + batch_size])):
            truth = labels[i : i + batch_size, ..., j]
            counted = truth != 0 if model.patches else torch.ones_like(truth, dtype=torch.bool)
            right[j] += ((logits.argmax(-1) == truth) & counted).sum()
            total[j] += counted.sum()
    model.train()
    return (right / total.clamp(min=1)).tolist()


def _chance(labels: torch.Tensor, patches: bool) -> list[float]:
    """Per label, the accuracy of always answering its most common class (patch labels: among classes other than 0)."""
    out = []
    for j in range(labels.shape[-1]):
        counts = labels[..., j].flatten().bincount()
        if patches:
            counts = counts[1:]
        out.append(float(counts.max()) / max(1, int(counts.sum())) if len(counts) else 0.0)
    return out


def pretrain_vision(
    model_cfg: TrainConfig,
    cfg: VisionPretrainConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    classes: dict[str, int],
    out_dir: Path,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `model_cfg`'s image encoder (its random init: sizes, `init_std`, `pos_init`) to classify `train`
    (`pixels [N, 3, S, S]` as the model's transform makes them; `labels [N, len(classes)]`, a column per label of
    `classes` (name -> number of classes), or `[N, T, len(classes)]` for the T patch tokens, class 0 meaning nothing
    there), measure it on `test`, and write `out_dir/vision.safetensors` and `out_dir/vision.json`. Returns
    `{"path", "accuracy": {label: share}, "chance", "loss", "steps", ...}`; patch labels are scored on the patches
    whose class is not 0."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from blip.io import atomic_write_json
    from blip.train.modeling import build_model

    pixels, labels = train
    patches = labels.ndim == 3
    torch.manual_seed(seed)
    model, _ = build_model(model_cfg.replace(task="pretrain", init="", vision_init=""))
    tokens = (model.vision_model.config.image_size // model.vision_model.config.patch_size) ** 2
    shape = (
        f"[{tokens}, {len(classes)}] labels per image (one row per patch)"
        if patches
        else f"a row of {len(classes)} labels per image"
    )
    for what, (x, y) in (("training", train), ("test", test)):
        if (
            len(x) != len(y)
            or not len(y)
            or y.ndim != labels.ndim
            or y.ndim not in (2, 3)
            or y.shape[-1] != len(classes)
            or (patches and y.shape[1] != tokens)
        ):
            raise ValueError(f"vision pretraining: {what} needs {shape}, and images")
        if y.min() < 0 or any(int(y[..., j].max()) >= n for j, n in enumerate(classes.values())):
            raise ValueError(f"vision pretraining: a {what} label outside its classes {classes}")
    classifier = _Classifier(model.vision_model, classes, patches=patches)
    classifier.train()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    losses: list[float] = []
    start = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="vision pretraining", unit="step", disable=not progress):
        if not batches:  # one pass over the images in a fresh order, then the next
            batches = list(torch.randperm(len(labels), generator=order).split(cfg.batch_size))
        index = batches.pop(0)
        for group in optimizer.param_groups:
            group["lr"] = _lr(cfg, step)
        loss = classifier.loss(pixels[index], labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / WEIGHTS_FILE
    state = {f"vision_model.{k}": v.detach().contiguous() for k, v in classifier.vision.state_dict().items()}
    save_file(state, str(path))
    tail = losses[-min(len(losses), 20) :]
    result = {
        "path": str(path),
        "accuracy": dict(zip(classes, _accuracy(classifier, *test))),
        "chance": dict(zip(classes, _chance(test[1], patches))),
        "labels": "patches" if patches else "image",
        "loss": sum(tail) / len(tail),
        "first_loss": losses[0],
        "steps": cfg.steps,
        "images": len(labels),
        "seconds": time.perf_counter() - start,
        "config": dataclasses.asdict(cfg),
    }
    atomic_write_json(out_dir / "vision.json", result)
    return result
