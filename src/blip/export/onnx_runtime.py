"""Captions, answers, matching and embeddings from an ONNX export (`blip export --format onnx`), without PyTorch.

    from blip.export.onnx_runtime import OnnxBlip
    m = OnnxBlip("exported/")                        # the folder `blip export` wrote
    m.caption("photo.jpg", num_beams=3)[0].text
    m.answer("photo.jpg", ["what colour is the dog?"])[0].text

Needs numpy, onnxruntime, tokenizers and Pillow only (the `[onnx]` extra brings onnxruntime): no torch, no model code.
The options and their checks are `blip.tasks.options`' (torch-free), so `caption`/`answer` take the same arguments as
`Blip.caption`/`Blip.answer` and give the same token ids for greedy decoding and beam search: the decoding loop below
is `blip.models.generation`'s (transformers' rules) in numpy. Not supported here: sampling (`do_sample`: torch's
random stream cannot be reproduced), ranking given VQA answers (`answers=`), BLIP-2 exports (there are none).

Preprocessing and decoding are re-implemented in numpy/`tokenizers` with the same operations as `blip.transforms`
and `blip.tokenizer` (tests check them against those, pixel for pixel and id for id).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from blip.export import INSTALL_HINT, MANIFEST, MANIFEST_FORMAT, ExportError, kv_names
from blip.tasks.options import CaptionOptions, OptionError, VqaOptions, takes_options
from blip.text_cleanup import CLEANUP_RULES, clean_up_tokenization  # noqa: F401 (CLEANUP_RULES: a public name here too)

NEG_INF_SCORE = np.float32(-1.0e9)  # blip.models.generation.NEG_INF_SCORE
PAD_ID = 0  # what a finished row is fed

ImageInput = Image.Image | str | os.PathLike | bytes


@dataclass
class Generated:
    """A caption or an answer: `text`, `score` and `token_ids` as `blip.Caption` / `blip.Answer` define them."""

    text: str
    score: float
    token_ids: list[int] = field(default_factory=list)


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"the ONNX runner needs onnxruntime: {INSTALL_HINT}") from e
    return onnxruntime


# --- preprocessing and tokenization (torch-free twins of blip.transforms and blip.tokenizer) ------------------------


def load_image(source: ImageInput) -> Image.Image:
    """A PIL image as it is, or a path / bytes decoded with its EXIF orientation applied."""
    if isinstance(source, Image.Image):
        return source
    fp = io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray) else Path(source).expanduser()
    with Image.open(fp) as opened:
        opened.load()
        return ImageOps.exif_transpose(opened)


def to_rgb(image: Image.Image, size: int) -> Image.Image:
    """`blip.transforms.to_rgb(image, size=size)`: transparency composited onto white, RGB, bicubic size x size."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def pixel_values(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """`blip.transforms.ImageTransform`: float32 `[B, 3, S, S]`, x/255 then (x - mean) / std, as transformers rounds."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    table = (levels[None, :] - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]
    pixels = np.stack([np.asarray(to_rgb(im, size), dtype=np.uint8) for im in images]).transpose(0, 3, 1, 2)
    out = np.empty(pixels.shape, dtype=np.float32)
    for c in range(3):
        out[:, c] = table[c][pixels[:, c]]
    return out


class WordPiece:
    """The export's `tokenizer/tokenizer.json` (written by `BlipTokenizer.save_pretrained`, its pipeline included):
    `[CLS] ... [SEP]` encoding with `BlipTokenizer`'s truncation, and its decoding."""

    def __init__(self, folder: Path, info: dict[str, Any]):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.vocab_size = int(info["vocab_size"])
        self.cleanup = bool(info.get("clean_up_tokenization_spaces", False))

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        ids = self._tokenizer.encode(text).ids
        if max_length is None or len(ids) <= max_length:
            return ids
        return ids[: max_length - 1] + [ids[-1]]

    def batch(self, texts: Sequence[str], max_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded int64 ids and mask `[B, L]`, L the longest row."""
        rows = [self.encode(t, max_length) for t in texts]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        text = self._tokenizer.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=True)
        return clean_up_tokenization(text) if self.cleanup else text


# --- the decoding loop (blip.models.generation in numpy) -----------------------------------------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Values and indices of the k largest entries per row, largest first (ties: lower index first)."""
    if k < x.shape[1]:
        part = np.argpartition(-x, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(x.shape[1]), x.shape)
    values = np.take_along_axis(x, part, axis=1)
    order = np.lexsort((part, -values), axis=1) if x.shape[0] else part
    index = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(x, index, axis=1), index


@dataclass(frozen=True)
class _Settings:
    max_new_tokens: int
    min_new_tokens: int
    num_beams: int
    repetition_penalty: float
    length_penalty: float
    num_return_sequences: int


def _process(scores: np.ndarray, seen: np.ndarray | None, new_len: int, cfg: _Settings, eos: list[int]) -> np.ndarray:
    """Repetition penalty, then min-length (`blip.models.generation._process_logits`)."""
    if seen is not None:
        penalty = np.float32(cfg.repetition_penalty)
        penalised = np.where(scores < 0, scores * penalty, scores / penalty).astype(np.float32)
        scores = np.where(seen, penalised, scores)
    if new_len < cfg.min_new_tokens:
        scores = scores.copy()
        scores[:, eos] = -np.inf
    return scores


def _seen(prefix: list[int], sources: int, rows: int, vocab: int) -> np.ndarray:
    seen = np.zeros((sources, vocab), dtype=bool)
    seen[:, [i for i in prefix if 0 <= i < vocab]] = True
    return np.repeat(seen, rows, axis=0)


class _DecoderState:
    """The decoder graph's state for `E` sources with the same prefix ids: past K/V per row, cross K/V per source."""

    def __init__(self, runner: OnnxBlip, cross: list[np.ndarray], cross_mask: np.ndarray, prefix: list[int]):
        self.runner, self.cross, self.cross_mask = runner, cross, cross_mask
        self.prefix_ids = [list(prefix)] * cross_mask.shape[0]
        self.past: list[np.ndarray] = []

    def _run(self, ids: np.ndarray) -> np.ndarray:
        r = self.runner
        feeds = {"input_ids": ids, "cross_mask": self.cross_mask}
        feeds.update(zip(r.past_names, self.past))
        feeds.update(zip(r.cross_names, self.cross))
        logits, *present = r.session("decoder").run(None, feeds)
        self.past = present
        return logits.astype(np.float32)

    def start(self, rows_per_source: int) -> np.ndarray:
        sources = len(self.prefix_ids)
        r = self.runner
        empty = np.zeros((sources, r.num_heads, 0, r.head_dim), dtype=r.dtype)
        self.past = [empty] * len(r.past_names)
        logits = self._run(np.array(self.prefix_ids, dtype=np.int64))
        if rows_per_source > 1:
            self.past = [np.repeat(p, rows_per_source, axis=0) for p in self.past]
        return logits

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self._run(tokens[:, None].astype(np.int64))

    def select(self, rows: np.ndarray, sources: np.ndarray | None) -> None:
        self.past = [p[rows] for p in self.past]
        if sources is not None:
            self.cross = [c[sources] for c in self.cross]
            self.cross_mask = self.cross_mask[sources]


def _greedy(state: _DecoderState, cfg: _Settings, eos: list[int]) -> list[list[tuple[list[int], float]]]:
    prefixes, steps = state.prefix_ids, cfg.max_new_tokens
    num_sources = len(prefixes)
    logits = state.start(1)
    vocab = logits.shape[-1]
    generated = np.zeros((num_sources, steps), dtype=np.int64)
    scores = np.zeros(num_sources, dtype=np.float32)
    lengths = np.full(num_sources, steps, dtype=np.int64)
    finished = np.zeros(num_sources, dtype=bool)
    rows_idx = np.arange(num_sources)
    seen = _seen(prefixes[0], num_sources, 1, vocab) if cfg.repetition_penalty != 1.0 else None
    for n in range(steps):
        logits = _process(logits, seen, n, cfg, eos)
        tokens = logits.argmax(-1)
        logprobs = np.take_along_axis(_log_softmax(logits), tokens[:, None], axis=1)[:, 0]
        was_finished = finished[rows_idx]
        tokens = np.where(was_finished, PAD_ID, tokens)
        generated[rows_idx, n] = tokens
        scores[rows_idx] += np.where(was_finished, np.float32(0), logprobs)
        just_done = ~was_finished & np.isin(tokens, eos)
        lengths[rows_idx[just_done]] = n + 1
        finished[rows_idx] = was_finished | just_done
        if n + 1 == steps:
            break
        done = finished[rows_idx]
        if done.all():
            break
        if done.any():
            keep = np.flatnonzero(~done)
            state.select(keep, keep)
            rows_idx, tokens = rows_idx[keep], tokens[keep]
            seen = None if seen is None else seen[keep]
        if seen is not None:
            seen[np.arange(len(tokens)), tokens] = True
        logits = state.step(tokens)
    return [[(prefixes[s] + generated[s, : lengths[s]].tolist(), float(scores[s]))] for s in range(num_sources)]


def _beam(state: _DecoderState, cfg: _Settings, eos: list[int]) -> list[list[tuple[list[int], float]]]:
    prefixes, k, steps = state.prefix_ids, cfg.num_beams, cfg.max_new_tokens
    num_sources = len(prefixes)
    candidates = max(2, 1 + len(eos)) * k
    logprobs = np.repeat(_log_softmax(state.start(k)), k, axis=0)
    vocab = logprobs.shape[-1]
    seen = _seen(prefixes[0], num_sources, k, vocab) if cfg.repetition_penalty != 1.0 else None

    running = np.zeros((num_sources, k, steps), dtype=np.int64)
    running_scores = np.zeros((num_sources, k), dtype=np.float32)
    running_scores[:, 1:] = NEG_INF_SCORE
    best = np.zeros((num_sources, k, steps), dtype=np.int64)
    best_scores = np.full((num_sources, k), NEG_INF_SCORE, dtype=np.float32)
    best_lengths = np.zeros((num_sources, k), dtype=np.int64)
    best_finished = np.zeros((num_sources, k), dtype=bool)
    active = np.arange(num_sources)
    top_k_mask = np.arange(candidates) < k
    penalty = np.float32(cfg.length_penalty)

    for n in range(steps):
        m = active.shape[0]
        logprobs = _process(logprobs, seen, n, cfg, eos)
        totals = (logprobs.reshape(m, k, vocab) + running_scores[:, :, None]).reshape(m, k * vocab)
        cand_scores, cand_index = _topk(totals, candidates)
        cand_beam, cand_token = cand_index // vocab, cand_index % vocab
        cand_seqs = np.take_along_axis(running, cand_beam[:, :, None], axis=1).copy()
        cand_seqs[:, :, n] = cand_token
        hits = np.isin(cand_token, eos) | (n + 1 >= steps)

        cont_scores = cand_scores + hits.astype(np.float32) * NEG_INF_SCORE
        keep = _topk(cont_scores, k)[1]
        running = np.take_along_axis(cand_seqs, keep[:, :, None], axis=1)
        running_scores = np.take_along_axis(cont_scores, keep, axis=1)
        source_beam = np.take_along_axis(cand_beam, keep, axis=1)

        norm_scores = cand_scores / np.float32((n + 1) ** float(penalty))
        just_finished = hits & top_k_mask[None, :]
        norm_scores = norm_scores + (~just_finished).astype(np.float32) * NEG_INF_SCORE
        merged_scores = np.concatenate([best_scores[active], norm_scores], axis=1)
        pick = _topk(merged_scores, k)[1]
        merged_seqs = np.concatenate([best[active], cand_seqs], axis=1)
        merged_lengths = np.concatenate([best_lengths[active], np.full_like(cand_token, n + 1)], axis=1)
        merged_finished = np.concatenate([best_finished[active], just_finished], axis=1)
        best[active] = np.take_along_axis(merged_seqs, pick[:, :, None], axis=1)
        best_scores[active] = np.take_along_axis(merged_scores, pick, axis=1)
        best_lengths[active] = np.take_along_axis(merged_lengths, pick, axis=1)
        best_finished[active] = np.take_along_axis(merged_finished, pick, axis=1)

        if n + 1 >= steps:
            break
        slots_full = best_finished[active].all(axis=1)
        best_possible = running_scores[:, 0] / np.float32((n + 1) ** float(penalty))
        worst_kept = best_scores[active].min(axis=1)
        improvable = ~slots_full | (best_possible > worst_kept)
        if not improvable.any():
            break

        beam_rows = np.arange(m)[:, None] * k + source_beam
        sources = None
        if not improvable.all():
            sources = np.flatnonzero(improvable)
            beam_rows = beam_rows[sources]
            active, running, running_scores = active[sources], running[sources], running_scores[sources]
        beam_rows = beam_rows.reshape(-1)
        state.select(beam_rows, sources)
        tokens = running[:, :, n].reshape(-1)
        if seen is not None:
            seen = seen[beam_rows]
            seen[np.arange(len(tokens)), tokens] = True
        logprobs = _log_softmax(state.step(tokens))

    return [
        [
            (prefixes[s] + best[s, j, : best_lengths[s, j]].tolist(), float(best_scores[s, j]))
            for j in range(cfg.num_return_sequences)
        ]
        for s in range(num_sources)
    ]


# --- the runner ------------------------------------------------------------------------------------------------------


def _as_list(value: Any) -> tuple[list[Any], bool]:
    if isinstance(value, list | tuple):
        return list(value), False
    return [value], True


class OnnxBlip:
    """An ONNX export loaded into ONNX Runtime: the task methods of `blip.Blip` its parts allow.

    `providers`: ONNX Runtime execution providers (default: CPU); `threads`: intra-op threads (default: ORT's)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        batch_size: int = 16,
    ):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExportError(f"{path}: cannot read the export's manifest ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ExportError(f"{path} is not a blip ONNX export manifest")
        self.ort = _ort()
        self.manifest = manifest
        self.kind: str = manifest["kind"]
        self.parts: dict[str, Any] = manifest["parts"]
        self.dtype = np.dtype(manifest["dtype"])
        text = manifest["text"]
        self.text = text
        self.num_heads, self.head_dim = int(text["num_heads"]), int(text["head_dim"])
        layers = int(text["num_layers"])
        self.past_names, self.cross_names = kv_names("past", layers), kv_names("cross", layers)
        image = manifest["image"]
        self.image_size, self.mean, self.std = int(image["size"]), image["mean"], image["std"]
        self.tokenizer = WordPiece(self.folder / manifest["tokenizer"]["folder"], manifest["tokenizer"])
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.threads, self.batch_size = threads, batch_size
        self._sessions: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"OnnxBlip(kind={self.kind!r}, parts={list(self.parts)}, dtype={self.dtype.name}, folder='{self.folder}')"
        )

    def session(self, part: str) -> Any:
        if part not in self.parts:
            raise ExportError(
                f"this export (a {self.kind!r} model) has no {part!r} part; it has {', '.join(self.parts)}"
            )
        if part not in self._sessions:
            options = self.ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            path = self.folder / self.parts[part]["file"]
            self._sessions[part] = self.ort.InferenceSession(str(path), options, providers=self.providers)
        return self._sessions[part]

    def _pixels(self, images: list[Image.Image]) -> np.ndarray:
        return pixel_values(images, self.image_size, self.mean, self.std)

    def encode_images(self, images: list[Image.Image]) -> list[np.ndarray]:
        """The vision graph's outputs for decoded images: image_embeds `[B, N, Dv]` (and image_features)."""
        return self.session("vision").run(None, {"pixel_values": self._pixels(images)})

    def _decode_inputs(self, images: Any) -> list[Image.Image]:
        items, _ = _as_list(images)
        if not items:
            raise ValueError("no images given")
        return [load_image(i) for i in items]

    def _texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask `[B, L]` of texts, cut at the model's text length, right-padded."""
        return self.tokenizer.batch(texts, int(self.text["max_text_tokens"]), int(self.text["pad_token_id"]))

    def _cross(self, states: np.ndarray) -> list[np.ndarray]:
        return self.session("cross_kv").run(None, {"encoder_states": states})

    def _generate(self, state: _DecoderState, options: Any) -> list[list[tuple[list[int], float]]]:
        cfg = _Settings(
            max_new_tokens=options.max_new_tokens,
            min_new_tokens=options.min_new_tokens,
            num_beams=options.num_beams,
            repetition_penalty=getattr(options, "repetition_penalty", 1.0),
            length_penalty=getattr(options, "length_penalty", 1.0),
            num_return_sequences=getattr(options, "num_captions", 1),
        )
        eos = [int(self.text["sep_token_id"])]
        return _beam(state, cfg, eos) if cfg.num_beams > 1 else _greedy(state, cfg, eos)

    def _check_length(self, prefix: int, options: Any) -> None:
        positions = int(self.text["max_positions"])
        if prefix + options.max_new_tokens > positions:
            raise OptionError(
                "max_new_tokens",
                f"prefix ({prefix} tokens with [DEC]) + max_new_tokens ({options.max_new_tokens}) is over the "
                f"model's {positions} text positions",
            )

    @takes_options(CaptionOptions)
    def caption(self, images: ImageInput | list[ImageInput], *, options: CaptionOptions) -> list[Any]:
        """Captions as `Blip.caption` makes them (greedy or beam search; a list per image when num_captions > 1)."""
        if options.do_sample:
            raise OptionError("do_sample", "the ONNX runner decodes greedily or with beam search, not by sampling")
        self.session("decoder")
        decoded = self._decode_inputs(images)
        bos = int(self.text["bos_token_id"])
        prefix = [bos] + (self.tokenizer.encode(options.prompt)[1:-1] if options.prompt else [])
        self._check_length(len(prefix), options)
        results: list[list[Generated]] = []
        for start in range(0, len(decoded), self.batch_size):
            image_embeds = self.encode_images(decoded[start : start + self.batch_size])[0]
            cross_mask = np.ones(image_embeds.shape[:2], dtype=np.int64)
            state = _DecoderState(self, self._cross(image_embeds), cross_mask, prefix)
            for sequences in self._generate(state, options):
                results.append([Generated(self.tokenizer.decode(ids), score, ids) for ids, score in sequences])
        return [r[0] for r in results] if options.num_captions == 1 else results

    @takes_options(VqaOptions)
    def answer(
        self, images: ImageInput | list[ImageInput], questions: str | list[str], *, options: VqaOptions
    ) -> list[Generated]:
        """One answer per question, as `Blip.answer` generates it; one image with several questions: that image for
        each (encoded once)."""
        if options.answers is not None:
            raise OptionError("answers", "the ONNX runner generates answers; ranking given answers needs PyTorch")
        if options.prompt_template is not None:
            raise OptionError("prompt_template", "BLIP VQA checkpoints take the question as it is")
        self.session("decoder")
        self._check_length(1, options)
        decoded = self._decode_inputs(images)
        question_list, single_question = _as_list(questions)
        if len(decoded) == 1 and not single_question:
            owners = [0] * len(question_list)
        elif single_question and len(decoded) > 1:
            question_list, owners = question_list * len(decoded), list(range(len(decoded)))
        elif len(decoded) == len(question_list):
            owners = list(range(len(decoded)))
        else:
            raise ValueError(f"{len(decoded)} images but {len(question_list)} questions: give one image or equal lists")
        for i, q in enumerate(question_list):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question {i} is empty or not a string")
        bos = int(self.text["bos_token_id"])
        results: list[Generated] = []
        for start in range(0, len(question_list), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(question_list)))
            used = sorted({owners[r] for r in rows})
            image_embeds = self.encode_images([decoded[i] for i in used])[0]
            if len(used) > 1:  # one image row per question; the questions of a single image share its one row
                local = {img: i for i, img in enumerate(used)}
                image_embeds = image_embeds[[local[owners[r]] for r in rows]]
            ids, mask = self._texts([question_list[r] for r in rows])
            states = self.session("question").run(
                None, {"image_embeds": image_embeds, "input_ids": ids, "attention_mask": mask}
            )[0]
            state = _DecoderState(self, self._cross(states), mask, [bos])
            for ((token_ids, score),) in self._generate(state, options):
                results.append(Generated(self.tokenizer.decode(token_ids), score, token_ids))
        return results

    def match(self, images: ImageInput | list[ImageInput], texts: str | list[str]) -> list[float]:
        """ITM probability that each (image, text) pair matches (`Blip.match`)."""
        self.session("itm")
        decoded = self._decode_inputs(images)
        text_list, single_text = _as_list(texts)
        if len(decoded) == 1 and not single_text:
            decoded = decoded * len(text_list)
        elif single_text and len(decoded) > 1:
            text_list = text_list * len(decoded)
        elif len(decoded) != len(text_list):
            raise ValueError(f"{len(decoded)} images but {len(text_list)} texts: give one image or equal lists")
        out: list[float] = []
        for start in range(0, len(text_list), self.batch_size):
            stop = min(start + self.batch_size, len(text_list))
            image_embeds = self.encode_images(decoded[start:stop])[0]
            ids, mask = self._texts(text_list[start:stop])
            logits = self.session("itm").run(
                None, {"image_embeds": image_embeds, "input_ids": ids, "attention_mask": mask}
            )[0]
            logits = logits.astype(np.float32)
            probs = np.exp(_log_softmax(logits))[:, 1]
            out.extend(float(p) for p in probs)
        return out

    def embed_images(self, images: ImageInput | list[ImageInput]) -> np.ndarray:
        """L2-normalised ITC image features `[n, embed_dim]` (float32)."""
        decoded = self._decode_inputs(images)
        self.session("vision")
        if len(self.parts["vision"]["outputs"]) < 2:
            raise ExportError(f"this export (a {self.kind!r} model) has no ITC image features")
        feats = [
            self.encode_images(decoded[s : s + self.batch_size])[1] for s in range(0, len(decoded), self.batch_size)
        ]
        return np.concatenate(feats).astype(np.float32)

    def embed_texts(self, texts: str | list[str]) -> np.ndarray:
        """L2-normalised ITC text features `[n, embed_dim]` (float32)."""
        text_list, _ = _as_list(texts)
        feats = []
        for start in range(0, len(text_list), self.batch_size):
            ids, mask = self._texts(text_list[start : start + self.batch_size])
            feats.append(self.session("text").run(None, {"input_ids": ids, "attention_mask": mask})[0])
        return np.concatenate(feats).astype(np.float32)

    def similarity(self, images: ImageInput | list[ImageInput], texts: str | list[str]) -> np.ndarray:
        """ITC cosine similarity `[n_images, n_texts]`."""
        return self.embed_images(images) @ self.embed_texts(texts).T


def load(folder: str | os.PathLike, **kwargs: Any) -> OnnxBlip:
    """`OnnxBlip(folder, ...)`."""
    return OnnxBlip(folder, **kwargs)
