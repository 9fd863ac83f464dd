"""The public Python API: `blip.load(...)` returns a `Blip` holding the model, its tokenizer and preprocessing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from blip.config import BlipConfig
from blip.distributed import resolve_device
from blip.models.blip import BlipModel
from blip.models.generation import GenerationConfig
from blip.tasks import caption as caption_task
from blip.tasks import itm as itm_task
from blip.tasks import vqa as vqa_task
from blip.tasks.common import Answer, ImageInput, as_list, pair_up, unique_images
from blip.tokenizer import BlipTokenizer
from blip.transforms import ImageTransform
from blip.weights.load import CheckpointError, LoadReport, load_model, locate, save_model
from blip.weights.registry import DEFAULT_TOKENIZER_SOURCE, EXAMPLE_FOR_TASK

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

    def require(self, task: str) -> None:
        """Raise ValueError naming the checkpoint kind that has `task` (caption, vqa, itm, itc) if this one lacks it."""
        if task not in self.tasks:
            raise ValueError(
                f"this checkpoint ({self.source or 'model'}, a {self.config.kind!r} model) has no head "
                f"for {task!r}: that needs {EXAMPLE_FOR_TASK[task]}"
            )

    # --- tasks -------------------------------------------------------------------------------------------------

    def caption(
        self,
        images: ImageInput | list[ImageInput],
        prompt: str | None = None,
        num_beams: int = 1,
        max_new_tokens: int = 20,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        top_p: float = 0.9,
        top_k: int = 0,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        seed: int | None = None,
    ) -> list[Any]:
        """Captions, one per image (a list of `num_captions` per image when `num_captions > 1`)."""
        self.require("caption")
        generation = GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            num_beams=num_beams,
            do_sample=do_sample,
            top_p=top_p,
            top_k=top_k,
            temperature=temperature,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            num_return_sequences=num_captions,
            seed=seed,
        )
        generation.validate()
        image_list, _ = as_list(images)
        decoded, index = unique_images(image_list)
        per_image = caption_task.caption_images(self, decoded, prompt=prompt, generation=generation)
        results = [per_image[i] for i in index]
        return [r[0] for r in results] if num_captions == 1 else results

    def answer(
        self,
        images: ImageInput | list[ImageInput],
        questions: str | list[str],
        answers: list[str] | None = None,
        num_beams: int = 1,
        max_new_tokens: int = 10,
        min_new_tokens: int = 0,
    ) -> list[Answer]:
        """One answer per question. One image with several questions encodes the image once. With `answers`,
        ranks that answer list instead of generating."""
        self.require("vqa")
        image_list, question_list = pair_up(images, questions, "question")
        if answers is not None and (not answers or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise ValueError("answers must be a non-empty list of non-empty strings")
        generation = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams)
        generation.validate()
        decoded, index = unique_images(image_list)
        return vqa_task.answer_questions(self, decoded, question_list, index, generation=generation, answers=answers)

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
    (`blip.list_pretrained()`), a local Hugging Face folder, or an original Salesforce `.pth` file.

    `kind` picks a part of a multi-part checkpoint (e.g. `kind="caption"` from a pretrain `.pth`); `image_size`
    resizes the position embeddings; `tokenizer` names a folder or vocab file when the checkpoint has none;
    `config` (BlipConfig or config.json) describes an original `.pth` whose sizes cannot be read off its shapes."""
    device = resolve_device(device)  # an unusable device is one clear error (DeviceError), before any loading
    torch_dtype = parse_dtype(dtype)
    from blip.train.checkpoint import is_training_checkpoint

    if config is None and is_training_checkpoint(Path(source).expanduser()):
        return _load_training_checkpoint(source, device, torch_dtype, kind, image_size, tokenizer, batch_size)
    model, folder, report = load_model(
        source, kind=kind, image_size=image_size, device=device, dtype=torch_dtype, config=config
    )
    blip_tokenizer = _load_tokenizer(folder, tokenizer, source)
    transform = ImageTransform.from_pretrained(folder) if (folder / "preprocessor_config.json").exists() else None
    if transform is None or transform.image_size != model.config.vision.image_size:
        base = transform or ImageTransform()
        transform = ImageTransform(image_size=model.config.vision.image_size, mean=base.mean, std=base.std)
    return Blip(model, blip_tokenizer, transform, source=str(source), report=report, batch_size=batch_size)


def _load_training_checkpoint(source, device, dtype, kind, image_size, tokenizer, batch_size) -> Blip:
    """A `blip train` checkpoint.pt: self-describing (config and tokenizer inside), so nothing is inferred."""
    from blip.train.modeling import as_blip, load_start_model, model_for_kind, with_image_size

    model, blip_tokenizer = load_start_model(str(source), str(tokenizer) if tokenizer else "")
    if kind is not None and kind != model.config.kind:
        model = model_for_kind(model, kind)
    blip_model = as_blip(with_image_size(model, image_size or 0), blip_tokenizer, source=str(source))
    blip_model.model.to(device=device, dtype=dtype or torch.float32)
    blip_model.batch_size = batch_size
    blip_model.report = LoadReport(str(source), str(source), "blip-train-checkpoint")
    return blip_model


def _load_tokenizer(folder: Path, tokenizer: str | os.PathLike | None, source: str | os.PathLike) -> BlipTokenizer:
    if tokenizer is not None:
        path = Path(tokenizer)
        return BlipTokenizer.from_pretrained(path if path.exists() else locate(tokenizer))
    if any((folder / name).exists() for name in ("tokenizer.json", "vocab.txt")):
        return BlipTokenizer.from_pretrained(folder)
    try:
        return BlipTokenizer.from_pretrained(locate(DEFAULT_TOKENIZER_SOURCE))
    except Exception as e:
        raise CheckpointError(
            f"{source} ships no tokenizer (no tokenizer.json or vocab.txt in {folder}) and the "
            f"default bert-base-uncased tokenizer from {DEFAULT_TOKENIZER_SOURCE} is not available: "
            f"pass tokenizer=<folder or vocab.txt>"
        ) from e


def create_model(
    config: BlipConfig | str, tokenizer: BlipTokenizer | str | os.PathLike, *, seed: int = 0, batch_size: int = 16
) -> Blip:
    """A randomly initialised model for a config or preset name (for training from scratch and tests)."""
    from blip.config import get_preset
    from blip.models.init import init_weights

    cfg = get_preset(config) if isinstance(config, str) else config
    torch.manual_seed(seed)
    model = BlipModel(cfg)
    init_weights(model)
    model.eval()
    tok = tokenizer if isinstance(tokenizer, BlipTokenizer) else BlipTokenizer.from_pretrained(tokenizer)
    return Blip(model, tok, ImageTransform(image_size=cfg.vision.image_size), source="(new)", batch_size=batch_size)
