"""The public Python API: `blip.load(...)` returns a `Blip` holding the model, its tokenizer and preprocessing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from blip.config import BlipConfig
from blip.devices import resolve_device
from blip.models.blip import BlipModel
from blip.tasks import caption as caption_task
from blip.tasks import itm as itm_task
from blip.tasks import vqa as vqa_task
from blip.tasks.common import Answer, ImageInput, as_list, pair_up, unique_images
from blip.tasks.options import CaptionOptions, VqaOptions, takes_options
from blip.tokenizer import BlipTokenizer
from blip.transforms import ImageTransform
from blip.weights.load import LoadReport, inference_copy, load_model, load_tokenizer, save_model
from blip.weights.registry import EXAMPLE_FOR_TASK

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class Blip:
    """A loaded BLIP checkpoint. Every method takes images as PIL images, paths or raw bytes (one or a list)."""

    def __init__(
        self,
        model: BlipModel,
        tokenizer: BlipTokenizer,
        transform: ImageTransform,
        *,
        source: str = "",
        report: LoadReport | None = None,
        batch_size: int = 16,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.source = source
        self.report = report
        self.batch_size = batch_size

    @property
    def config(self) -> BlipConfig:
        return self.model.config

    @property
    def tasks(self) -> set[str]:
        return set(self.config.tasks)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        return f"Blip(kind={self.config.kind!r}, tasks={sorted(self.tasks)}, source={self.source!r})"

    @classmethod
    def from_model(
        cls, model: BlipModel, tokenizer: BlipTokenizer, *, source: str = "(trained)", batch_size: int = 16
    ) -> Blip:
        """Wrap a model in memory (e.g. one being trained) for inference: its own copy of the weights, in eval mode
        and without dropout, with the default preprocessing at the model's image size."""
        clean = inference_copy(model)
        transform = ImageTransform(image_size=clean.config.vision.image_size)
        return cls(clean, tokenizer, transform, source=source, batch_size=batch_size)

    def require(self, task: str) -> None:
        """Raise ValueError naming the checkpoint kind that has `task` (caption, vqa, itm, itc) if this one lacks it."""
        if task not in self.tasks:
            raise ValueError(
                f"this checkpoint ({self.source or 'model'}, a {self.config.kind!r} model) has no head "
                f"for {task!r}: that needs {EXAMPLE_FOR_TASK[task]}"
            )

    # --- tasks -------------------------------------------------------------------------------------------------

    @takes_options(CaptionOptions)
    def caption(self, images: ImageInput | list[ImageInput], *, options: CaptionOptions) -> list[Any]:
        """Captions, one per image (a list of `num_captions` per image when `num_captions > 1`). The options and
        their defaults are `blip.tasks.options.CaptionOptions`'s (prompt, num_beams, max_new_tokens, ...)."""
        self.require("caption")
        options.check_model(self)
        image_list, _ = as_list(images)
        decoded, index = unique_images(image_list)
        per_image = caption_task.caption_images(self, decoded, prompt=options.prompt, generation=options.generation())
        results = [per_image[i] for i in index]
        return [r[0] for r in results] if options.num_captions == 1 else results

    @takes_options(VqaOptions)
    def answer(
        self, images: ImageInput | list[ImageInput], questions: str | list[str], *, options: VqaOptions
    ) -> list[Answer]:
        """One answer per question. One image with several questions encodes the image once. With `answers`,
        ranks that answer list instead of generating. Options: `blip.tasks.options.VqaOptions`."""
        self.require("vqa")
        options.check_model(self)
        image_list, question_list = pair_up(images, questions, "question")
        decoded, index = unique_images(image_list)
        generation = options.generation()
        return vqa_task.answer_questions(
            self, decoded, question_list, index, generation=generation, answers=options.answers
        )

    def match(self, images: ImageInput | list[ImageInput], texts: str | list[str]) -> list[float]:
        """ITM probability that each (image, text) pair matches."""
        self.require("itm")
        image_list, text_list = pair_up(images, texts, "text")
        decoded, index = unique_images(image_list)
        return itm_task.match_probabilities(self, decoded, text_list, index)

    def similarity(self, images: ImageInput | list[ImageInput], texts: str | list[str]) -> torch.Tensor:
        """ITC cosine similarity `[n_images, n_texts]`."""
        return self.embed_images(images) @ self.embed_texts(texts).T

    def embed_images(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        """L2-normalised image features `[n, embed_dim]`."""
        self.require("itc")
        image_list, _ = as_list(images)
        decoded, index = unique_images(image_list)
        return itm_task.image_embeddings(self, decoded)[torch.tensor(index)]

    def embed_texts(self, texts: str | list[str]) -> torch.Tensor:
        """L2-normalised text features `[n, embed_dim]`."""
        self.require("itc")
        text_list, _ = as_list(texts)
        if not text_list or not all(isinstance(t, str) for t in text_list):
            raise ValueError("texts must be a string or a non-empty list of strings")
        return itm_task.text_embeddings(self, text_list)

    # --- persistence -------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a complete Hugging Face folder (weights, config, tokenizer, preprocessor) transformers can load."""
        folder = Path(path)
        save_model(self.model, folder)
        self.tokenizer.save_pretrained(folder)
        self.transform.save_pretrained(folder)
        processor = {"processor_class": "BlipProcessor"}
        (folder / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def load(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    kind: str | None = None,
    image_size: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    config: BlipConfig | str | os.PathLike | None = None,
    batch_size: int = 16,
) -> Blip:
    """Load a BLIP checkpoint: a hub id (`Salesforce/blip-image-captioning-base`), a short name
    (`blip.list_pretrained()`), a local Hugging Face folder, an original Salesforce `.pth` file, a safetensors file,
    or a `blip train` checkpoint.pt (self-describing: its config and tokenizer are inside).

    `kind` picks a part of a multi-part checkpoint (e.g. `kind="caption"` from a pretrain `.pth`); `image_size`
    resizes the position embeddings; `tokenizer` names a folder or vocab file when the checkpoint has none;
    `config` (BlipConfig or config.json) describes an original `.pth` whose sizes cannot be read off its shapes.
    Every problem with the checkpoint raises `blip.weights.load.CheckpointError` (a ValueError) in one line."""
    device = resolve_device(device)  # an unusable device is one clear error (DeviceError), before any loading
    torch_dtype = parse_dtype(dtype)
    loaded = load_model(source, kind=kind, image_size=image_size, device=device, dtype=torch_dtype, config=config)
    blip_tokenizer = load_tokenizer(loaded, tokenizer, source)
    model = loaded.model
    folder = loaded.folder
    transform = None
    if folder is not None and (folder / "preprocessor_config.json").exists():
        transform = ImageTransform.from_pretrained(folder)
    if transform is None or transform.image_size != model.config.vision.image_size:
        base = transform or ImageTransform()
        transform = ImageTransform(image_size=model.config.vision.image_size, mean=base.mean, std=base.std)
    return Blip(model, blip_tokenizer, transform, source=str(source), report=loaded.report, batch_size=batch_size)


def create_model(
    config: BlipConfig | str, tokenizer: BlipTokenizer | str | os.PathLike, *, seed: int = 0, batch_size: int = 16
) -> Blip:
    """A randomly initialised model for a config or preset name (for training from scratch and tests)."""
    from blip.config import get_preset
    from blip.models.init import init_weights

    cfg = (get_preset(config) if isinstance(config, str) else config).validate()
    torch.manual_seed(seed)
    model = BlipModel(cfg)
    init_weights(model)
    model.eval()
    tok = tokenizer if isinstance(tokenizer, BlipTokenizer) else BlipTokenizer.from_pretrained(tokenizer)
    return Blip(model, tok, ImageTransform(image_size=cfg.vision.image_size), source="(new)", batch_size=batch_size)
