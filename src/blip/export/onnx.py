"""ONNX export of a BLIP checkpoint: one graph per part a runtime needs, plus `manifest.json` and the tokenizer.

Parts (which ones a checkpoint has depends on its kind, `KIND_PARTS`); every batch and sequence axis is dynamic:
- `vision`: pixel_values `[batch, 3, S, S]` (float32) -> image_embeds `[batch, N, Dv]` (+ image_features
  `[batch, E]`, L2-normalised ITC features, when the model has the ITC heads);
- `text`: input_ids, attention_mask `[batch, seq]` -> text_features `[batch, E]` (ITC, L2-normalised);
- `itm`: image_embeds `[images, N, Dv]`, input_ids, attention_mask `[batch, seq]` -> itm_logits `[batch, 2]`; the
  text rows are grouped per image (`batch` a multiple of `images`, row r reads image r // (batch / images));
- `question` (VQA): the same inputs -> question_states `[batch, seq, D]` (the image-grounded encoder's output);
- `cross_kv`: encoder_states `[sources, N, W]` (image tokens, or question states for VQA) -> cross_key_{i},
  cross_value_{i} `[sources, H, N, d]` per decoder layer: projected once per image, not per step or beam;
- `decoder`: one decoding step with an explicit KV cache: input_ids `[batch, seq]`, cross_mask `[sources, N]`
  (1 = attend), past_key_{i}/past_value_{i} `[batch, H, past, d]` (past may be 0) and the cross K/V ->
  logits `[batch, V]` (last position) and present_key_{i}/present_value_{i} `[batch, H, past + seq, d]`; rows are
  grouped per source like `itm`'s.

The graphs are traced (TorchScript-based `torch.onnx.export(dynamo=False)`: it needs no onnxscript) through the
model's own modules, with `aten_linears()` so the oneDNN product (no ONNX form) is not taken. fp16 exports cast the
weights before tracing; pixel_values stay float32 (the graph casts them), token ids and masks are int64.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from blip.export import INSTALL_HINT, MANIFEST, MANIFEST_FORMAT, ExportError, check_request, kv_names
from blip.models.bert import CrossKV
from blip.models.kernels import aten_linears
from blip.tasks.common import MAX_TEXT_TOKENS  # questions and ITM/ITC texts are cut there

if TYPE_CHECKING:
    from blip.api import Blip
    from blip.models.blip import BlipModel

_logger = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization as one op; scaled_dot_product_attention exports from 14
TOKENIZER_DIR = "tokenizer"
MANIFEST_VERSION = 1
KIND_PARTS: dict[str, tuple[str, ...]] = {
    "caption": ("vision", "cross_kv", "decoder"),
    "vqa": ("vision", "question", "cross_kv", "decoder"),
    "retrieval": ("vision", "text", "itm"),
    "pretrain": ("vision", "text", "itm", "cross_kv", "decoder"),
}
ALL_PARTS = ("vision", "text", "itm", "question", "cross_kv", "decoder")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def require_onnx() -> Any:
    """The `onnx` module, or one ExportError naming the extra that installs it."""
    try:
        import onnx
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from e
    return onnx


# --- the traced modules -----------------------------------------------------------------------------------------------


class _Vision(nn.Module):
    def __init__(self, model: BlipModel):
        super().__init__()
        self.model = model
        self.heads = model.vision_proj is not None

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_embeds = self.model.encode_image(pixel_values)  # (B, N, Dv)
        if not self.heads:
            return (image_embeds,)
        return image_embeds, self.model.image_features(image_embeds)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as 0 / -inf in the model's dtype: the exporter turns a boolean mask into a float32
    bias, which would promote an fp16 graph's attention to float32."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def _encode(
    encoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cross: CrossKV | None,
    first_only: bool,
) -> torch.Tensor:
    """`TextTransformer.forward` with the key mask always applied (its `mask.all()` shortcut is data-dependent)."""
    x = encoder.embeddings(input_ids, 0)  # (B, T, D)
    mask = _additive(attention_mask[:, None, None, :].bool(), x.dtype)  # (B, 1, 1, T)
    last = len(encoder.layers) - 1
    for i, layer in enumerate(encoder.layers):
        x = layer(x, mask, False, cross, None, i, 1 if first_only and i == last else None)
    return x


class _Text(nn.Module):
    def __init__(self, model: BlipModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = _encode(self.model.text_encoder, input_ids, attention_mask, None, first_only=True)
        return self.model.text_features(states)  # (B, E)


class _Multimodal(nn.Module):
    """The image-grounded encoder over images grouped per text row: ITM logits, or (VQA) all question states."""

    def __init__(self, model: BlipModel, itm: bool):
        super().__init__()
        self.model, self.itm = model, itm

    def forward(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        encoder = self.model.text_encoder
        cross = encoder.cross_kv(image_embeds)
        states = _encode(encoder, input_ids, attention_mask, cross, first_only=self.itm)
        return self.model.itm_logits(states) if self.itm else states


class _CrossKV(nn.Module):
    def __init__(self, model: BlipModel):
        super().__init__()
        self.bert = model.text_decoder.bert

    def forward(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cross = self.bert.cross_kv(encoder_states)
        return tuple(t for pair in zip(cross.keys, cross.values) for t in pair)


class _PastCache:
    """`KVCache`'s interface over given past keys/values: appending concatenates, and what results is the present."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = list(keys), list(values)
        self.length = keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
        self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def advance(self, steps: int) -> None:
        pass


class _DecoderStep(nn.Module):
    """One decoding step of the text decoder: new tokens over a past of any length, grouped cross-attention."""

    def __init__(self, model: BlipModel):
        super().__init__()
        self.decoder = model.text_decoder
        self.num_layers = len(self.decoder.bert.layers)

    def forward(self, input_ids: torch.Tensor, cross_mask: torch.Tensor, *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.num_layers
        past, cross = kv[: 2 * n], kv[2 * n :]
        cache = _PastCache(list(past[0::2]), list(past[1::2]))
        bert = self.decoder.bert
        start, length = cache.length, input_ids.shape[1]
        x = bert.embeddings(input_ids, start)  # (B, T, D), positions start .. start + T - 1
        queries = torch.arange(length, device=input_ids.device) + start
        keys = torch.arange(start + length, device=input_ids.device)
        causal = (keys[None, :] <= queries[:, None])[None, None]  # (1, 1, T, past + T): causal over the cache
        self_mask = _additive(causal, x.dtype)
        encoder = CrossKV(list(cross[0::2]), list(cross[1::2]), cross_mask[:, None, None, :].bool())
        for i, layer in enumerate(bert.layers):
            x = layer(x, self_mask, True, encoder, cache, i)
        logits = self.decoder.cls.predictions(x[:, -1])  # (B, V)
        return (logits, *(t for pair in zip(cache.keys, cache.values) for t in pair))


# --- export -----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Graph:
    module: nn.Module
    args: tuple[torch.Tensor, ...]
    inputs: list[str]
    outputs: list[str]
    axes: dict[str, dict[int, str]]


def _graphs(model: BlipModel, parts: tuple[str, ...]) -> dict[str, _Graph]:
    """The traced module, example inputs, names and dynamic axes of each part. The examples group 2 text rows per
    image (so the grouped cross-attention is what gets traced) and give the decoder a non-empty past."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    size = cfg.vision.image_size
    text = cfg.text
    rows, seq, past = 2, 3, 2
    width = text.hidden_size if cfg.kind == "vqa" else cfg.vision.hidden_size  # what the decoder cross-attends to
    ids = torch.randint(5, min(text.vocab_size, 100), (rows, seq))
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[1, -1] = 0
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        image_embeds = model.encode_image(pixels.to(dtype))
    graphs: dict[str, _Graph] = {}
    for part in parts:
        if part == "vision":
            outputs = ["image_embeds"] + (["image_features"] if model.vision_proj is not None else [])
            axes = {"pixel_values": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
            graphs[part] = _Graph(_Vision(model), (pixels.expand(2, -1, -1, -1),), ["pixel_values"], outputs, axes)
        elif part == "text":
            axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
            axes["text_features"] = {0: "batch"}
            graphs[part] = _Graph(_Text(model), (ids, mask), ["input_ids", "attention_mask"], ["text_features"], axes)
        elif part in ("itm", "question"):
            name = "itm_logits" if part == "itm" else "question_states"
            axes = {
                "image_embeds": {0: "images"},
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                name: {0: "batch"} if part == "itm" else {0: "batch", 1: "seq"},
            }
            graphs[part] = _Graph(
                _Multimodal(model, itm=part == "itm"),
                (image_embeds, ids, mask),
                ["image_embeds", "input_ids", "attention_mask"],
                [name],
                axes,
            )
        elif part == "cross_kv":
            layers = len(model.text_decoder.bert.layers)
            states = torch.randn(1, 4, width).to(dtype)
            names = kv_names("cross", layers)
            axes = {"encoder_states": {0: "sources", 1: "tokens"}, **{n: {0: "sources", 2: "tokens"} for n in names}}
            graphs[part] = _Graph(_CrossKV(model), (states,), ["encoder_states"], names, axes)
        elif part == "decoder":
            decoder = model.text_decoder
            layers, heads = len(decoder.bert.layers), text.num_attention_heads
            head_dim = text.hidden_size // heads
            with torch.no_grad():
                cross = decoder.bert.cross_kv(torch.randn(1, 4, width).to(dtype))
            cross_flat = [t for pair in zip(cross.keys, cross.values) for t in pair]
            past_flat = [torch.randn(rows, heads, past, head_dim).to(dtype) for _ in range(2 * layers)]
            cross_mask = torch.ones(1, 4, dtype=torch.long)
            past_names, present_names = kv_names("past", layers), kv_names("present", layers)
            cross_names = kv_names("cross", layers)
            axes = {"input_ids": {0: "batch", 1: "seq"}, "cross_mask": {0: "sources", 1: "tokens"}}
            axes.update({n: {0: "batch", 2: "past"} for n in past_names})
            axes.update({n: {0: "sources", 2: "tokens"} for n in cross_names})
            axes["logits"] = {0: "batch"}
            axes.update({n: {0: "batch", 2: "past_seq"} for n in present_names})
            graphs[part] = _Graph(
                _DecoderStep(model),
                (ids, cross_mask, *past_flat, *cross_flat),
                ["input_ids", "cross_mask", *past_names, *cross_names],
                ["logits", *present_names],
                axes,
            )
    return graphs


def resolve_parts(kind: str, parts: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The parts to export for a checkpoint of `kind` (all of its parts when `parts` is None), or ExportError."""
    available = KIND_PARTS[kind]
    if parts is None:
        return available
    chosen = []
    for part in parts:
        if part not in ALL_PARTS:
            raise ExportError(f"unknown part {part!r}: parts are {', '.join(ALL_PARTS)}")
        if part not in available:
            raise ExportError(
                f"part {part!r} is not supported for a {kind!r} checkpoint: it has {', '.join(available)}"
            )
        if part not in chosen:
            chosen.append(part)
    if not chosen:
        raise ExportError(f"no parts given: a {kind!r} checkpoint has {', '.join(available)}")
    return tuple(chosen)


_NP_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


def _io(names: list[str], tensors: list[torch.Tensor], axes: dict[str, dict[int, str]]) -> list[dict[str, Any]]:
    """Name, dtype and shape of each of a graph's inputs or outputs: the dynamic axes by name, the rest as numbers."""
    out = []
    for name, tensor in zip(names, tensors):
        dynamic = axes.get(name, {})
        shape = [dynamic.get(i, size) for i, size in enumerate(tensor.shape)]
        out.append({"name": name, "dtype": _NP_DTYPES[tensor.dtype], "shape": shape})
    return out


def export_onnx(
    blip: Blip,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    parts: list[str] | tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Write `out/<part>.onnx` for each part, `out/tokenizer/` and `out/manifest.json`; returns the manifest.

    `dtype`: "float32" or "float16" (the graphs' weights and activations; ids and masks stay int64, pixels float32).
    `parts`: a subset of the checkpoint's parts (default: all of them, `KIND_PARTS[kind]`)."""
    from blip.api import Blip2

    if isinstance(blip, Blip2):
        raise ExportError("ONNX export supports BLIP checkpoints; BLIP-2 export is not implemented")
    check_request("onnx", dtype)
    onnx = require_onnx()
    kind = blip.config.kind
    chosen = resolve_parts(kind, parts)
    torch_dtype = _TORCH_DTYPES[dtype]
    model = blip.model
    first = next(model.parameters())
    packed = any(p.is_mkldnn for p in model.parameters())  # oneDNN-packed weights (blip.load on CPU) do not trace
    if packed or first.dtype != torch_dtype or first.device.type != "cpu":  # a copy: the caller's model stays fast
        model = copy.deepcopy(model).to(device="cpu", dtype=torch_dtype)
    model.eval()

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_parts: dict[str, Any] = {}
    torch.manual_seed(0)  # the example inputs only fix the traced shapes; seeded so exports are reproducible
    with aten_linears(), torch.no_grad():
        graphs = _graphs(model, chosen)
        for part, graph in graphs.items():
            path = folder / f"{part}.onnx"
            _logger.info("exporting %s to %s", part, path)
            with warnings.catch_warnings():
                # The tracer warns about Python branches on shapes (e.g. "one text row per image?"); the examples
                # are chosen so the general branch is traced, and the tests run other shapes through the graphs.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter's notice
                torch.onnx.export(
                    graph.module,
                    graph.args,
                    str(path),
                    dynamo=False,
                    input_names=graph.inputs,
                    output_names=graph.outputs,
                    dynamic_axes=graph.axes,
                    opset_version=OPSET,
                    do_constant_folding=True,
                )
            onnx.checker.check_model(str(path))
            results = graph.module(*graph.args)
            results = [results] if isinstance(results, torch.Tensor) else list(results)
            manifest_parts[part] = {
                "file": path.name,
                "inputs": _io(graph.inputs, list(graph.args), graph.axes),
                "outputs": _io(graph.outputs, results, graph.axes),
            }

    blip.tokenizer.save_pretrained(folder / TOKENIZER_DIR)  # fixed file names (blip.tokenizer.TOKENIZER_FILES)
    cfg = blip.config
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "kind": kind,
        "dtype": dtype,
        "opset": OPSET,
        "parts": manifest_parts,
        "image": {
            "size": blip.transform.image_size,
            "mean": list(blip.transform.mean),
            "std": list(blip.transform.std),
        },
        "text": {
            "num_layers": cfg.text.num_hidden_layers,
            "num_heads": cfg.text.num_attention_heads,
            "head_dim": cfg.text.hidden_size // cfg.text.num_attention_heads,
            "max_positions": cfg.text.max_position_embeddings,
            "vocab_size": cfg.text.vocab_size,
            "bos_token_id": cfg.text.bos_token_id,
            "sep_token_id": cfg.text.sep_token_id,
            "pad_token_id": cfg.text.pad_token_id,
            "max_text_tokens": MAX_TEXT_TOKENS,
        },
        "tokenizer": {
            "folder": TOKENIZER_DIR,
            "files": sorted(p.name for p in (folder / TOKENIZER_DIR).iterdir()),
            "vocab_size": blip.tokenizer.vocab_size,
            "clean_up_tokenization_spaces": blip.tokenizer.clean_up_tokenization_spaces,
        },
        "config": dataclasses.asdict(cfg),  # BlipConfig (vision, text, kind, embed_dim)
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
