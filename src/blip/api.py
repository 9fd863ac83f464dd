"""The public Python API: `blip.load(...)` returns a `Blip` holding the model, its tokenizer and preprocessing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from blip.blip2_config import Blip2Config
from blip.config import BlipConfig
from blip.devices import resolve_device
from blip.models.blip import BlipModel
from blip.models.blip2.blip2 import Blip2Model
from blip.models.kernels import pack_linears
from blip.tasks import blip2 as blip2_task
from blip.tasks import blip2_itm
from blip.tasks import caption as caption_task
from blip.tasks import explain as explain_task
from blip.tasks import itm as itm_task
from blip.tasks import reason as reason_task
from blip.tasks import vqa as vqa_task
from blip.tasks.common import Answer, ImageInput, Verdict, as_list, check_texts, pair_up, unique_images
from blip.tasks.explain import Explanation
from blip.tasks.options import CaptionOptions, VqaOptions, takes_options
from blip.tokenizer import BlipTokenizer, LmTokenizer, load_text_tokenizer
from blip.transforms import PREPROCESSOR_FILE, ImageTransform
from blip.weights.errors import CheckpointError
from blip.weights.load import Loaded, LoadReport, inference_copy, load_model, load_tokenizer, save_blip2, save_model
from blip.weights.registry import BLIP2_PROMPT_TEMPLATE, EXAMPLE_FOR_TASK, EXAMPLE_FOR_TASK_BLIP2, pretrained_info

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

    _itm = itm_task  # the matching / embedding functions of this model family (BLIP-2: `blip.tasks.blip2_itm`)

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
        if next(clean.parameters()).device.type == "cpu":
            pack_linears(clean)
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
        """ITM probability that each (image, text) pair matches; each distinct image is encoded once."""
        self.require("itm")
        image_list, text_list = pair_up(images, texts, "text")
        decoded, index = unique_images(image_list)
        return self._itm.match_probabilities(self, decoded, text_list, index)

    def similarity(self, images: ImageInput | list[ImageInput], texts: str | list[str]) -> torch.Tensor:
        """ITC cosine similarity `[n_images, n_texts]` (BLIP-2: per pair, the largest over the query features)."""
        return self._itm.similarity(self.embed_images(images), self.embed_texts(texts))

    def embed_images(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        """L2-normalised image features `[n, embed_dim]` (BLIP-2: `[n, Q, E]`, one per query token); float32, CPU."""
        self.require("itc")
        image_list, _ = as_list(images)
        decoded, index = unique_images(image_list)
        return self._itm.image_embeddings(self, decoded)[torch.tensor(index)]

    def embed_texts(self, texts: str | list[str]) -> torch.Tensor:
        """L2-normalised text features `[n, embed_dim]`; float32, CPU."""
        self.require("itc")
        text_list, _ = as_list(texts)
        if not text_list or not all(isinstance(t, str) for t in text_list):
            raise ValueError("texts must be a string or a non-empty list of strings")
        return self._itm.text_embeddings(self, text_list)

    def reason(
        self,
        image_a: ImageInput | list[ImageInput],
        image_b: ImageInput | list[ImageInput],
        statements: str | list[str],
    ) -> list[Verdict]:
        """NLVR2 (an 'nlvr' model): a `Verdict(label, score)` per statement about the image pair (image_a, image_b);
        `score` = P(true), `label` = score >= 0.5. Lists pair up (equal lengths; a single item goes with every
        row); each distinct image is encoded once. Image a is NLVR2's left image, image b the right one."""
        self.require("reason")
        firsts, seconds, texts = reason_rows(image_a, image_b, statements)
        decoded, index = unique_images(firsts + seconds)
        n = len(texts)
        return reason_task.reason_pairs(self, decoded, texts, index[:n], index[n:])

    def explain(self, image: ImageInput, text: str, layer: int | None = None) -> Explanation:
        """Grad-CAM of image-text matching: per word of `text`, a map `[g, g]` over the image's patch grid of where
        the ITM head's match logit leans, read at cross-attention `layer` (0-based; default: the middle one, LAVIS's
        6 of 12). `word_maps.sum(0) == text_map`. The method and its conventions: `blip.tasks.explain`."""
        self.require("itm")
        if isinstance(image, list | tuple) or not isinstance(text, str):
            raise ValueError("explain takes one image and one text (a string)")
        decoded, _ = unique_images([image])
        return explain_task.explain_pair(self, decoded[0], text, layer)

    # --- video (zero-shot: frames through the image model; `blip.tasks.video`, decoding in `blip.video`) ---------

    def _video_frames(self, task: str, video: Any, num_frames: int, name: str) -> list[Any]:
        """Refuse BLIP-2 and a model without the head for `task`, then decode and sample `video`'s frames."""
        from blip.tasks.video import check_num_frames, check_video_model
        from blip.video import read_frames

        check_video_model(self)
        self.require(task)
        check_num_frames(num_frames)
        return read_frames(video, num_frames, size=self.transform.image_size, name=name)

    def embed_videos(self, videos: Any, num_frames: int = 8) -> torch.Tensor:
        """L2-normalised ITC video features `[n, embed_dim]` (float32, CPU): the normalised mean over `num_frames`
        uniformly sampled frames of each frame's projected `[CLS]`. `videos`: a path or the bytes of a video file
        or its frames, a list of PIL images (one video), or a list of such videos."""
        from blip.tasks.video import video_embeddings, video_label
        from blip.video import is_frame_list

        one = not isinstance(videos, list | tuple) or is_frame_list(videos)  # a list of PIL images: one video's frames
        items = [videos] if one else list(videos)
        if not items:
            raise ValueError("no videos given")
        names = [video_label(v, i, len(items)) for i, v in enumerate(items)]
        return video_embeddings(self, [self._video_frames("itc", v, num_frames, n) for v, n in zip(items, names)])

    def match_video(self, video: Any, texts: str | list[str], num_frames: int = 8) -> list[float]:
        """ITM P(match) of one video with each text: the text cross-attends to all `num_frames` frames' tokens
        concatenated (`[1, N * (1 + P), D]`). `video`: a path, the bytes of a video file, or its frames."""
        from blip.tasks.video import match_videos, text_list, video_label

        frames = self._video_frames("itm", video, num_frames, video_label(video, 0, 1))
        items = text_list(texts, "text")
        return match_videos(self, [frames], items, [0] * len(items))

    @takes_options(VqaOptions)
    def answer_video(
        self, video: Any, questions: str | list[str], num_frames: int = 16, *, options: VqaOptions
    ) -> list[Answer]:
        """One answer per question about one video, from all `num_frames` frames' tokens concatenated (zero-shot
        videoQA). Options as `answer`'s (`blip.tasks.options.VqaOptions`: generate, or rank `answers`)."""
        from blip.tasks.video import answer_video_questions, text_list, video_label

        frames = self._video_frames("vqa", video, num_frames, video_label(video, 0, 1))
        options.check_model(self)
        items = text_list(questions, "question")
        return answer_video_questions(self, frames, items, generation=options.generation(), answers=options.answers)

    # --- persistence -------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a complete Hugging Face folder (weights, config, tokenizer, preprocessor) transformers can load."""
        folder = Path(path)
        save_model(self.model, folder)
        self.tokenizer.save_pretrained(folder)
        self.transform.save_pretrained(folder)
        processor = {"processor_class": "BlipProcessor"}
        (folder / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def reason_rows(image_a: Any, image_b: Any, statements: Any) -> tuple[list[Any], list[Any], list[str]]:
    """`reason`'s arguments as rows: lists pair up, a single item goes with every row; ValueError/TypeError name
    what is wrong."""
    columns = {"image_a": as_list(image_a), "image_b": as_list(image_b), "statements": as_list(statements)}
    lengths = {name: len(items) for name, (items, single) in columns.items() if not single}
    for name, n in lengths.items():
        if n == 0:
            raise ValueError(f"{name} is an empty list")
    if len(set(lengths.values())) > 1:
        given = ", ".join(f"{n} {name}" for name, n in lengths.items())
        raise ValueError(f"{given}: lists pair up, so they must have the same length (or give a single item)")
    n = next(iter(lengths.values()), 1)
    firsts, seconds, texts = (items * n if single else items for items, single in columns.values())
    check_texts(texts, "statement")
    return firsts, seconds, texts


class Blip2(Blip):
    """A loaded BLIP-2 checkpoint: the same methods as `Blip` (what `tasks` says this checkpoint can do).

    - generation kinds ("opt", "t5"; Blip2ForConditionalGeneration): `caption`, `answer`;
      `tokenizer` is the language model's, `prompt_template` formats VQA questions ("Question: {} Answer:").
    - retrieval ("retrieval"; Blip2ForImageTextRetrieval): `match` = softmax P(match) of the ITM head averaged over
      the query outputs; `embed_images` = `[n, Q, E]` (one L2-normalised feature per query token);
      `embed_texts` = `[n, E]` ([CLS] feature); `similarity` = max over the Q query features of the cosine with the
      text feature, `[n_images, n_texts]`, as transformers' `use_image_text_matching_head=False` forms it.
      `tokenizer` is the Q-Former's BERT WordPiece; texts are cut at the Q-Former's positions (512), not at BLIP's 35.
    """

    _itm = blip2_itm

    def __init__(
        self,
        model: Blip2Model,
        tokenizer: Any,
        transform: ImageTransform,
        *,
        source: str = "",
        report: LoadReport | None = None,
        batch_size: int = 16,
        prompt_template: str = BLIP2_PROMPT_TEMPLATE,
        folder: Path | None = None,
    ):
        super().__init__(model, tokenizer, transform, source=source, report=report, batch_size=batch_size)
        self.prompt_template = prompt_template
        self.folder = folder  # the checkpoint folder (generation_config.json etc. for the generation work)

    @property
    def config(self) -> Blip2Config:
        return self.model.config

    def __repr__(self) -> str:
        return f"Blip2(kind={self.config.kind!r}, tasks={sorted(self.tasks)}, source={self.source!r})"

    @classmethod
    def from_model(cls, *args: Any, **kwargs: Any) -> Blip2:
        raise NotImplementedError("BLIP-2 models are loaded (blip.load), not trained here")

    def require(self, task: str) -> None:
        """Raise ValueError naming the checkpoint kind that has `task` (caption, vqa, itm, itc) if this one lacks it."""
        if task not in self.tasks:
            raise ValueError(
                f"this checkpoint ({self.source or 'model'}, a BLIP-2 {self.config.kind!r} model) cannot do "
                f"{task!r}: that needs {EXAMPLE_FOR_TASK_BLIP2[task]}"
            )

    # --- generation ------------------------------------------------------------------------------------------------

    @takes_options(CaptionOptions)
    def caption(self, images: ImageInput | list[ImageInput], *, options: CaptionOptions) -> list[Any]:
        """Captions, one per image (a list of `num_captions` per image when `num_captions > 1`), optionally
        continuing `prompt`. `token_ids`: OPT -> BOS, prompt, generated ids; T5 -> decoder start, generated ids (what
        transformers' generate returns for that image alone, without the image placeholders). With `seed`, each
        image samples from its own generator: its captions do not depend on the other images of the call."""
        self.require("caption")
        options.check_model(self)
        image_list, _ = as_list(images)
        decoded, index = unique_images(image_list)
        generators = self._generators(options, len(decoded))
        per_image = blip2_task.caption_images(
            self, decoded, prompt=options.prompt, generation=options.generation(), generators=generators
        )
        results = [per_image[i] for i in index]
        return [r[0] for r in results] if options.num_captions == 1 else results

    @takes_options(VqaOptions)
    def answer(
        self, images: ImageInput | list[ImageInput], questions: str | list[str], *, options: VqaOptions
    ) -> list[Answer]:
        """One answer per question, each put in `prompt_template` (None: the checkpoint's, "Question: {} Answer:").
        One image with several questions encodes the image and runs the Q-Former once. `token_ids`: OPT -> the
        generated ids; T5 -> decoder start + generated ids; `text`: the answer alone."""
        self.require("vqa")
        options.check_model(self)
        image_list, question_list = pair_up(images, questions, "question")
        decoded, index = unique_images(image_list)
        return blip2_task.answer_questions(
            self,
            decoded,
            question_list,
            index,
            generation=options.generation(),
            prompt_template=options.prompt_template,
        )

    def explain(self, image: ImageInput, text: str, layer: int | None = None) -> Explanation:
        """Not for BLIP-2: its text never attends to the image (see the error)."""
        raise ValueError(explain_task.BLIP2_REFUSAL)

    def _generators(self, options: CaptionOptions, count: int) -> list[torch.Generator] | None:
        if not options.do_sample or options.seed is None:
            return None
        return [torch.Generator(device=self.device).manual_seed(options.seed) for _ in range(count)]

    # --- persistence -----------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a folder transformers loads (Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval and
        Blip2Processor): config, weights, tokenizer files, preprocessor_config.json, processor_config.json."""
        folder = Path(path)
        save_blip2(self.model, folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        self.transform.save_pretrained(folder, processor_class="Blip2Processor")
        queries = self.config.num_query_tokens if self.config.image_token_index is not None else None
        processor = {"processor_class": "Blip2Processor", "num_query_tokens": queries}
        (folder / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def _load_blip2(loaded: Loaded, source: str | os.PathLike, tokenizer: Any, batch_size: int) -> Blip2:
    """The tokenizer, preprocessing and prompt template of a loaded BLIP-2 model."""
    model, folder = loaded.model, loaded.folder
    where = Path(tokenizer).expanduser() if tokenizer is not None else folder
    info = pretrained_info(str(source))
    if model.config.kind == "retrieval":
        text_tokenizer = load_blip2_qformer_tokenizer(where, source, model.config.qformer.vocab_size)
    else:
        # Loaded by hub name, transformers 5 keeps tokenizer.json's own pipeline for the Salesforce BLIP-2 repos
        # (tokenization_auto's MODEL_IDS_TO_TOKENIZERS_BACKEND); from a local folder it rebuilds the class's.
        by_name = tokenizer is None and info is not None
        text_tokenizer = load_lm_tokenizer(where, source, "file" if by_name else "class")
    transform = _transform_for(folder, model.config.vision.image_size)
    template = info.prompt_template if info and info.prompt_template else BLIP2_PROMPT_TEMPLATE
    return Blip2(
        model,
        text_tokenizer,
        transform,
        source=str(source),
        report=loaded.report,
        batch_size=batch_size,
        prompt_template=template,
        folder=folder,
    )


def load_blip2_qformer_tokenizer(folder: Path | None, source: str | os.PathLike, vocab_size: int) -> BlipTokenizer:
    """The retrieval model's BERT WordPiece tokenizer from its folder (tokenizer.json or vocab.txt)."""
    names = ("tokenizer.json", "vocab.txt")
    if folder is None or not any((folder / n).exists() for n in names):
        raise CheckpointError(
            f"{source} ships no tokenizer (no tokenizer.json or vocab.txt in {folder}): pass tokenizer=<folder> "
            f"(--tokenizer) holding the bert-base-uncased files"
        )
    try:
        result = BlipTokenizer.from_pretrained(folder)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from e
    # The word pieces must fit the Q-Former's embeddings; Blip2Processor's added `<image>` token (past them) does not
    # reach the model: transformers strips those positions, and we never prepend them.
    pieces = result._tokenizer.get_vocab_size(with_added_tokens=False)
    if pieces > vocab_size:
        raise CheckpointError(
            f"the tokenizer in {folder} has {pieces} word pieces but the Q-Former's vocabulary has {vocab_size}"
        )
    return result


def load_lm_tokenizer(folder: Path | None, source: str | os.PathLike, pipeline: str = "class") -> LmTokenizer:
    """The language model's tokenizer (GPT-2 BPE for OPT, SentencePiece-derived tokenizer.json for T5)."""
    if folder is None:
        raise CheckpointError(f"{source} ships no tokenizer: pass tokenizer=<folder> (--tokenizer)")
    try:
        result = load_text_tokenizer(folder, pipeline=pipeline)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}; pass tokenizer=<folder> (--tokenizer) holding its files") from e
    if not isinstance(result, LmTokenizer):
        raise CheckpointError(f"{folder} holds a BERT WordPiece tokenizer, not the language model's (GPT-2 BPE / T5)")
    return result


def _transform_for(folder: Path | None, image_size: int) -> ImageTransform:
    """Preprocessing from the folder (processor_config.json's `image_processor` entry, else
    preprocessor_config.json; defaults without either or without a folder), at the model's image size."""
    transform = ImageTransform.from_pretrained(folder) if folder is not None else None
    if transform is None or transform.image_size != image_size:
        base = transform or ImageTransform()
        transform = ImageTransform(image_size=image_size, mean=base.mean, std=base.std)
    return transform


def load(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    kind: str | None = None,
    image_size: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    config: BlipConfig | Blip2Config | str | os.PathLike | None = None,
    batch_size: int = 16,
) -> Blip:
    """Load a BLIP or BLIP-2 checkpoint (a `Blip2` for a config.json with model_type "blip-2"): a hub id
    (`Salesforce/blip-image-captioning-base`, `Salesforce/blip2-opt-2.7b`), a short name
    (`blip.list_pretrained()`), a local Hugging Face folder, an original Salesforce `.pth` file, a safetensors file,
    or a `blip train` checkpoint.pt (self-describing: its config and tokenizer are inside).

    `kind` picks a part of a multi-part checkpoint (e.g. `kind="caption"` from a pretrain `.pth`); `image_size`
    resizes the position embeddings; `tokenizer` names a folder or vocab file when the checkpoint has none;
    `config` (BlipConfig or config.json) describes an original `.pth` whose sizes cannot be read off its shapes.
    Every problem with the checkpoint raises `blip.weights.load.CheckpointError` (a ValueError) in one line."""
    device = resolve_device(device)  # an unusable device is one clear error (DeviceError), before any loading
    torch_dtype = parse_dtype(dtype)
    loaded = load_model(source, kind=kind, image_size=image_size, device=device, dtype=torch_dtype, config=config)
    if device.type == "cpu":
        pack_linears(loaded.model)  # oneDNN's own weight layout, in place: same results, faster products
    if isinstance(loaded.model, Blip2Model):
        return _load_blip2(loaded, source, tokenizer, batch_size)
    blip_tokenizer = load_tokenizer(loaded, tokenizer, source)
    model = loaded.model
    folder = loaded.folder
    # a BLIP folder's settings are read only when it holds preprocessor_config.json (defaults otherwise)
    has_preprocessor = folder is not None and (folder / PREPROCESSOR_FILE).exists()
    transform = _transform_for(folder if has_preprocessor else None, model.config.vision.image_size)
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
