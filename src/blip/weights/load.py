"""THE load path: locate -> read -> convert -> config (validated) -> choose parts -> resize -> build -> strict load.

Every way into a model goes through here: `blip.load` of a hub id, a short name (`caption-base`), a local Hugging Face
folder (config.json + safetensors or pytorch_model.bin), a single weights file (original Salesforce `.pth`, an HF
state dict, safetensors), or one of our training checkpoints (`checkpoint.pt`, self-describing: config and tokenizer
inside); training's `init=`, CapFilt and the batch jobs call `blip.load`, and `model_for_kind` / `inference_copy`
run the same steps on a model in memory.

The steps, each done once:
- locate: a path that exists, or looks like one, is a path; otherwise a hub id fetched through the local cache.
- read: safetensors, a sharded index (shards must lie inside the folder), or a torch file with `weights_only=True`.
- convert: the original layout's names onto ours (`blip.weights.convert`); training-only state is dropped.
- config: given (`config=`), the checkpoint's own (config.json, a training checkpoint's `model_config`) or inferred
  from tensor shapes (original `.pth`; 64-wide heads, refused when the widths say otherwise), then validated
  (`BlipConfig.validate`) before anything is allocated from it.
- choose parts: the kind asked for (`kind=`) keeps the parts it has (a captioner from a pretrain file drops the
  encoder and heads); a part it needs and the checkpoint lacks is an error.
- resize: the position embeddings, bicubically, when the image size differs.
- build on the meta device without random init, strict `load_state_dict(assign=True)`, tie the LM head, dtype and
  device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from blip.blip2_config import BLIP2_KIND_TASKS, Blip2Config
from blip.config import KIND_PARTS, BlipConfig, ConfigError
from blip.models.blip import BlipModel
from blip.models.blip2.blip2 import Blip2Model, keeps_fp32
from blip.models.vit import resize_pos_embed
from blip.tokenizer import BlipTokenizer
from blip.weights import checkpoint, convert
from blip.weights.errors import CheckpointError
from blip.weights.read import EXPECTED, index_shards, read_safetensors, read_torch_file
from blip.weights.registry import DEFAULT_TOKENIZER_SOURCE, HUB_FILES, resolve_name

__all__ = [
    "CheckpointError",
    "check_keys",
    "LoadReport",
    "Loaded",
    "inference_config",
    "inference_copy",
    "load_model",
    "load_strict",
    "load_tokenizer",
    "load_vision_weights",
    "locate",
    "model_for_kind",
    "read_state_dict",
    "save_model",
]

_logger = logging.getLogger(__name__)

POS_EMBED = "vision_model.embeddings.position_embedding"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".json", ".txt")
# A hub id: `owner/name` (or a legacy bare `name`); anything else that does not exist is a missing path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Which state-dict prefixes each part of a model owns (`KIND_PARTS`).
PART_PREFIXES = {
    "text_encoder": ("text_encoder.",),
    "text_decoder": ("text_decoder.",),
    "heads": ("vision_proj.", "text_proj.", "itm_head."),
    "cls_head": ("cls_head.",),
}
# The VQA answer decoder cross-attends to question states (text width); made from another kind's decoder, which
# cross-attends to image tokens, these start fresh when the widths differ.
VQA_CROSS_KV = re.compile(
    r"^text_decoder\.bert\.encoder\.layer\.\d+\.crossattention\.self\.(key|value)\.(weight|bias)$"
)
LOCATE_HINT = (
    "pass a local folder (a saved model: `blip convert`, `blip train` and `blip demo --smoke` make one), a hub id "
    "that is in the Hugging Face cache (HF_HOME; HF_HUB_OFFLINE=1 uses only the cache), or reach the hub"
)


@dataclass
class LoadReport:
    source: str
    weights_file: str
    layout: str  # "hf", "salesforce" or "blip-train-checkpoint"
    dropped_keys: list[str] = field(default_factory=list)
    resized_position_embedding: tuple[int, int] | None = None  # (old patches, new patches)
    fresh_keys: list[str] = field(default_factory=list)  # initialised randomly: a kind change could not fill them


@dataclass
class Loaded:
    """What `load_model` found: the model, and where its tokenizer and preprocessing come from."""

    model: BlipModel | Blip2Model
    report: LoadReport
    folder: Path | None  # where tokenizer / preprocessor files may lie beside the weights (None: not looked for)
    tokenizer_files: dict[str, str] | None = None  # a training checkpoint's own tokenizer, by fixed file names


# --- locate ----------------------------------------------------------------------------------------------------------


def locate(source: str | os.PathLike) -> Path:
    """A local folder or file for `source`, downloading hub checkpoints into the local cache first.

    Paths that look like paths are paths (they start with `.`, `/` or `~`, have more than one `/`, name a file
    suffix, or their first component exists here): a missing one is "checkpoint not found", never a hub lookup."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if _looks_like_path(text):
        raise CheckpointError(f"checkpoint not found: {path} does not exist")
    return _download(resolve_name(text))


def _looks_like_path(text: str) -> bool:
    if text.startswith((".", "/", "~")) or "\\" in text or text.endswith(FILE_SUFFIXES):
        return True
    parts = text.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).expanduser().exists()) or not HUB_ID.match(text)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a core dependency
        raise CheckpointError(f"loading {repo_id!r} from the hub needs huggingface_hub") from e
    patterns = [p for p in HUB_FILES if not p.startswith("pytorch_model")]
    errors: list[BaseException] = []
    for local_only in (False, True):
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
            if not any((folder / f).exists() for f in WEIGHT_FILES):
                folder = Path(
                    snapshot_download(repo_id, allow_patterns=["pytorch_model*.bin*"], local_files_only=local_only)
                )
            return folder
        except Exception as e:  # network errors, missing repos, offline mode: try the cache, then report
            _logger.debug("hub lookup of %s (local_files_only=%s) failed: %r", repo_id, local_only, e)
            errors.append(e)
    raise CheckpointError(f"cannot load {repo_id!r}: {_hub_reason(repo_id, errors[0])}; {LOCATE_HINT}")


def _hub_reason(repo_id: str, error: BaseException) -> str:
    """What went wrong with the hub, in words (huggingface_hub's messages name its own internals)."""
    from huggingface_hub import constants

    name = type(error).__name__
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE or name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
        offline = (
            "the hub is switched off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub is not reachable"
        )
        return f"it is not a local path, {offline} and the Hugging Face cache ({cache}) does not hold it"
    if name == "GatedRepoError":
        return f"the hub repository {repo_id} is gated: log in with an account that has access (`hf auth login`)"
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError"):
        return f"it is not a local path, and the Hugging Face hub has no repository {repo_id} (or it is private)"
    if name == "HFValidationError":
        return "it is not a local path, nor a valid hub id (owner/name)"
    return f"it is not a local path, the hub could not provide it ({name}) and the cache ({cache}) does not hold it"


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).exists():
            return folder / name
    candidates = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pth"))
    if len(candidates) == 1:
        return candidates[0]
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


# --- read ------------------------------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read safetensors, a sharded index, or a torch pickle (weights_only) into a flat state dict."""
    contents = _read_weights(path)
    if checkpoint.is_checkpoint_dict(contents):
        return checkpoint.model_entries(checkpoint.check_version(contents, path), str(path))[0]
    return contents


def load_vision_weights(source: str | os.PathLike, grid_size: int) -> dict[str, torch.Tensor]:
    """The image encoder of any checkpoint `blip.load` reads, or of a timm/DeiT ViT file (the ImageNet-trained ViT
    BLIP's pretraining starts from), as our `VisionTransformer`'s state dict; its position table resized to
    `grid_size` patches a side."""
    path = locate(source)
    weights_path = _weights_file(path) if path.is_dir() else path
    try:
        state = convert.vision_part(read_state_dict(weights_path))
        pos = "embeddings.position_embedding"
        state[pos] = resize_pos_embed(state[pos], grid_size)
    except ValueError as e:
        raise CheckpointError(f"{weights_path}: {e}") from e
    return state


def _read_weights(path: Path) -> dict[str, torch.Tensor] | dict:
    """A flat state dict, or a training checkpoint's whole dict (recognised by its `format` entry)."""
    if path.name.endswith(".index.json"):
        state: dict[str, torch.Tensor] = {}
        for shard in index_shards(path):
            state.update(read_state_dict(shard))
        return state
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    contents = read_torch_file(path, mmap=True)
    if checkpoint.is_checkpoint_dict(contents):
        return contents
    try:
        return convert.unwrap_state_dict(contents)
    except ValueError as e:
        raise CheckpointError(f"{path} is a PyTorch file but not a model: {e}; {EXPECTED}") from e


def read_config(folder: Path, kind: str | None = None) -> BlipConfig | None:
    """`folder/config.json` as a BlipConfig (validated), or None when there is none."""
    path = folder / "config.json"
    if not path.exists():
        return None
    return read_config_file(path, kind)


_C = TypeVar("_C", BlipConfig, Blip2Config)


def read_config_file(path: Path, kind: str | None = None) -> BlipConfig:
    return _read_hf_config(path, kind, BlipConfig, (None, "blip"), "a BLIP model")


def _read_hf_config(path: Path, kind: str | None, cls: type[_C], model_types: tuple[str | None, ...], what: str) -> _C:
    """`path` (an HF config.json) as a validated `cls`; every problem is one CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if isinstance(data, dict) and data.get("model_type") not in model_types:
        raise CheckpointError(f"{path}: model_type {data.get('model_type')!r} is not {what}")
    try:
        return cls.from_hf_dict(data, kind=kind).validate()  # type: ignore[arg-type]
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def _given_config(config: BlipConfig | str | os.PathLike, kind: str | None) -> tuple[BlipConfig, str]:
    if isinstance(config, BlipConfig):
        return _validated(config.replace(kind=kind) if kind else config, "config"), "config"
    path = Path(config).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no config.json at {path}")
    return read_config_file(file, kind), str(file)


def _validated(config: BlipConfig, origin: str, hint: str = "") -> BlipConfig:
    try:
        return config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{origin}: {e}{hint}") from e


# --- the pipeline ----------------------------------------------------------------------------------------------------


def load_model(
    source: str | os.PathLike,
    *,
    kind: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    config: BlipConfig | str | os.PathLike | None = None,
) -> Loaded:
    """Build the model a checkpoint describes and load it strictly (eval mode, inference config: no dropout).

    `kind` takes a part out of a bigger checkpoint (a captioner from a pretrain file); `image_size` resizes the
    position embeddings; `config` (a BlipConfig or an HF config.json) overrides the checkpoint's own or, for an
    original `.pth` that has none, replaces what is inferred from tensor shapes (which assumes 64-wide heads)."""
    if isinstance(config, Blip2Config) or kind in ("opt", "t5"):  # "retrieval" names a kind of both families
        return load_blip2(
            locate(source), source, kind=kind, image_size=image_size, device=device, dtype=dtype, config=config
        )
    if kind is not None and kind not in KIND_PARTS:
        raise CheckpointError(f"unknown model kind {kind!r}; expected one of {', '.join(KIND_PARTS)}")
    path = locate(source)
    if is_blip2(path):
        return load_blip2(path, source, kind=kind, image_size=image_size, device=device, dtype=dtype, config=config)
    weights_path = _weights_file(path) if path.is_dir() else path
    folder: Path | None = path if path.is_dir() else path.parent
    origin = str(weights_path)
    if config is not None:
        config, origin = _given_config(config, kind)
    elif path.is_dir() or path.suffix == ".safetensors":
        config = read_config(path if path.is_dir() else path.parent, kind)
        origin = str((path if path.is_dir() else path.parent) / "config.json") if config else origin

    contents = _read_weights(weights_path)
    tokenizer_files = None
    if checkpoint.is_checkpoint_dict(contents):
        raw, stored, tokenizer_files = checkpoint.model_entries(
            checkpoint.check_version(contents, weights_path), origin
        )
        layout, folder = checkpoint.FORMAT, None  # self-describing: nothing is looked for beside it
        if config is None:
            config = stored.replace(kind=kind) if kind else stored
    else:
        raw = contents
        layout = "salesforce" if convert.is_salesforce_layout(raw) else "hf"

    hint = ""
    try:
        state, dropped = convert.convert_state_dict(raw)
        source_kind = convert.infer_kind(state)
        if config is None:
            config = convert.infer_config(state, kind)
            hint = f" (a config inferred from the tensor shapes; {convert.CONFIG_HINT})"
        elif config.kind is None:  # a config.json without `architectures`: the weights tell the kind
            config = config.replace(kind=source_kind)
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{weights_path}: unexpected checkpoint layout (missing {e}); {EXPECTED}") from e
    except ValueError as e:
        raise CheckpointError(f"{weights_path}: {e}") from e
    config = _validated(inference_config(config), origin, hint)
    if image_size is not None:
        resized = config.replace(vision=dataclasses.replace(config.vision, image_size=image_size))
        config = _validated(resized, f"image_size={image_size!r}")

    report = LoadReport(str(source), str(weights_path), layout, dropped)
    model = assemble(state, config, source_kind, str(weights_path), report=report, dtype=dtype)
    model.eval().to(device)
    return Loaded(model, report, folder, tokenizer_files)


def assemble(
    state: dict[str, torch.Tensor],
    config: BlipConfig,
    source_kind: str,
    name: str,
    *,
    report: LoadReport | None = None,
    dtype: torch.dtype | None = None,
    copy: bool = False,
) -> BlipModel:
    """Choose parts -> resize -> build on meta -> strict load -> tie: the model `config` describes, from a converted
    state dict of a `source_kind` model. `copy` clones the tensors (else the model takes them over)."""
    report = report or LoadReport(name, name, "state-dict")
    state = dict(state)
    if config.kind == "nlvr" and source_kind != "nlvr":
        state = _nlvr_from(state, source_kind, name)
    state, dropped = _choose_parts(state, config.kind, source_kind, name)
    report.dropped_keys += dropped
    if POS_EMBED in state and state[POS_EMBED].shape[1] != config.vision.num_positions:
        old = state[POS_EMBED].shape[1] - 1
        state[POS_EMBED] = resize_pos_embed(state[POS_EMBED], config.vision.grid_size)
        report.resized_position_embedding = (old, config.vision.num_positions - 1)
        _logger.info("resized position embedding from %d to %d patches", old, config.vision.num_positions - 1)
    with torch.device("meta"), _skip_random_init():
        model = BlipModel(config)
    expected = model.state_dict()
    if config.kind == "vqa" and source_kind != "vqa":
        report.fresh_keys += _fresh_cross_kv(state, expected, config.kind)
    if config.kind == "nlvr" and source_kind != "nlvr":
        report.fresh_keys += _fresh_missing(state, expected, NLVR_FRESH, config.kind)
    target = dtype or torch.float32
    state = _owned(state, copy, target)
    load_strict(model, state, name)
    return model


def _choose_parts(
    state: dict[str, torch.Tensor], kind: str, source_kind: str, name: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep what a `kind` model has; a part it needs that the checkpoint lacks entirely is an error naming both."""
    parts = KIND_PARTS[kind]
    unused = tuple(p for part, prefixes in PART_PREFIXES.items() if part not in parts for p in prefixes)
    fresh = ("cls_head",) if kind == "nlvr" and source_kind != "nlvr" else ()  # made from another kind: starts fresh
    lacking = [p for p in parts if p not in fresh and not any(k.startswith(PART_PREFIXES[p]) for k in state)]
    if lacking:
        raise CheckpointError(
            f"a {kind!r} model cannot be made from a {source_kind!r} model ({name}): it has no "
            f"{' and no '.join(p.replace('_', ' ') for p in lacking)}"
        )
    if not unused:
        return state, []
    kept = {k: v for k, v in state.items() if not k.startswith(unused)}
    return kept, sorted(set(state) - set(kept))


# What an NLVR2 model made from another kind's weights lacks: the merge layers and the classifier start fresh.
NLVR_FRESH = re.compile(r"^(text_encoder\.encoder\.layer\.\d+\.crossattention\.output\.merge_layer|cls_head\.\d+)\.")


def _nlvr_from(state: dict[str, torch.Tensor], source_kind: str, name: str) -> dict[str, torch.Tensor]:
    """An NLVR2 model from any BLIP with an image-grounded encoder, as the original code starts fine-tuning: the
    single cross-attention copied into both branches (`convert.nlvr_from_blip`)."""
    if not any(k.startswith("text_encoder.") for k in state):
        raise CheckpointError(
            f"an 'nlvr' model cannot be made from a {source_kind!r} model ({name}): it has no image-grounded text "
            f"encoder (use a pretrain, retrieval or VQA checkpoint)"
        )
    return convert.nlvr_from_blip(state)


def _fresh_missing(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], pattern: re.Pattern, kind: str
) -> list[str]:
    """Parameters matching `pattern` that `state` lacks, initialised as the original code does: layers inside the
    BERT (`merge_layer`) by BERT's init (normal 0.02, zero bias), the `cls_head` outside it by PyTorch's Linear
    default (uniform in +-1/sqrt(fan_in), weight and bias)."""
    fresh = []
    for key, value in expected.items():
        if pattern.match(key) and key not in state:
            tensor = torch.zeros(value.shape, dtype=torch.float32)
            if key.startswith("cls_head."):
                fan_in = expected[key.rsplit(".", 1)[0] + ".weight"].shape[1]
                nn.init.uniform_(tensor, -(fan_in**-0.5), fan_in**-0.5)
            elif key.endswith("weight"):
                nn.init.normal_(tensor, std=0.02)
            state[key] = tensor
            fresh.append(key)
    if fresh:
        _logger.info("%s: %d parameters start fresh, e.g. %s", kind, len(fresh), fresh[0])
    return fresh


def _fresh_cross_kv(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], kind: str) -> list[str]:
    """A VQA answer decoder made from another kind's decoder: cross-attention keys/values whose width differs (they
    read question states, not image tokens) start from the training init (truncated normal 0.02, zero bias)."""
    fresh = []
    for key, value in expected.items():
        if VQA_CROSS_KV.match(key) and key in state and state[key].shape != value.shape:
            tensor = torch.zeros(value.shape, dtype=torch.float32)
            if key.endswith("weight"):
                nn.init.trunc_normal_(tensor, std=0.02)
            state[key] = tensor
            fresh.append(key)
    if fresh:
        _logger.warning("%s: %d parameters start fresh (shape differs), e.g. %s", kind, len(fresh), fresh[0])
    return fresh


def _owned(state: dict[str, torch.Tensor], copy: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors in `dtype`, no two keys sharing storage (a pretrain file with shared text layers stores one tensor
    under an encoder and a decoder name; the model must not alias them). The tied LM head is re-tied after loading."""
    tied = convert.DECODER_WEIGHT in state and convert.DECODER_EMBEDDINGS in state
    out, seen = {}, set()
    for key, value in state.items():
        if tied and key == convert.DECODER_WEIGHT:
            continue
        value = value.detach()
        if value.is_floating_point():
            value = value.to(dtype)
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        if copy or (ptr is not None and ptr in seen):
            value = value.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = value
    if tied:
        out[convert.DECODER_WEIGHT] = out[convert.DECODER_EMBEDDINGS]
    return out


def inference_config(config: BlipConfig) -> BlipConfig:
    """`config` without training-only settings (dropout, stochastic depth)."""
    text = dataclasses.replace(config.text, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return config.replace(text=text, vision=dataclasses.replace(config.vision, drop_path_rate=0.0))


def model_for_kind(model: BlipModel, kind: str) -> BlipModel:
    """A new `kind` model holding `model`'s matching parts (a copy; `model` is left as it is), e.g. the caption /
    VQA / retrieval model inside a pretrained one: the same part choice as `blip.load(..., kind=kind)`."""
    config = model.config.replace(kind=kind)
    device = next(model.parameters()).device
    return assemble(model.state_dict(), config, model.config.kind, "model in memory", copy=True).to(device)


def inference_copy(model: BlipModel) -> BlipModel:
    """`model`'s weights in a model of its inference config (no dropout), in eval mode: its own copy."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    config = inference_config(model.config)
    state = model.state_dict()
    copy = assemble(state, config, model.config.kind, "model", dtype=dtype, copy=True)
    return copy.to(device).eval()


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "zeros_", "ones_", "constant_")
_init_lock = threading.Lock()


@contextlib.contextmanager
def _skip_random_init() -> Iterator[None]:
    """Skip the parameter init that module constructors run: the checkpoint replaces every parameter anyway, and
    on the meta device PyTorch implements the random fills in Python, so the first one imports ~800 modules
    (sympy, mpmath, ...): 70 MiB of resident memory and about a second, for nothing."""
    with _init_lock:
        saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, _keep)
        try:
            yield
        finally:
            for name, function in saved.items():
                setattr(nn.init, name, function)


def _keep(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


def load_strict(model: BlipModel, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True, assign=True)` with a one-line error that names the missing, unexpected or
    mis-shaped keys; then the LM head is tied to the word embeddings."""
    check_keys(model, state, source, f"a {model.config.kind!r} BLIP model")
    model.load_state_dict(state, strict=True, assign=True)
    if model.text_decoder is not None:
        model.text_decoder.tie_weights()


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """One-line CheckpointError naming the missing, unexpected or mis-shaped keys of `state` for `model`."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                problems.append(f"{title}: {shown}")
        raise CheckpointError(f"checkpoint {source} does not match {what}: {'; '.join(problems)}")


# --- BLIP-2 ----------------------------------------------------------------------------------------------------------


def is_blip2(path: Path) -> bool:
    """Whether `path` (a folder, or a weights file beside a config.json) holds a BLIP-2 checkpoint."""
    file = (path if path.is_dir() else path.parent) / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "blip-2"


def read_blip2_config(path: Path, kind: str | None = None) -> Blip2Config:
    """A BLIP-2 `config.json` as a validated Blip2Config; every problem is one CheckpointError naming the file."""
    return _read_hf_config(path, kind, Blip2Config, ("blip-2",), "a BLIP-2 model ('blip-2')")


def blip2_inference_config(config: Blip2Config) -> Blip2Config:
    """`config` without dropout (the Q-Former's hub configs say 0.1, which only matters for training)."""
    qformer = dataclasses.replace(config.qformer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    vision = dataclasses.replace(config.vision, attention_dropout=0.0, drop_path_rate=0.0)
    return config.replace(qformer=qformer, vision=vision)


def load_blip2(
    path: Path,
    source: str | os.PathLike,
    *,
    kind: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    config: Blip2Config | str | os.PathLike | None = None,
) -> Loaded:
    """The BLIP-2 steps of the load path: config (validated) -> read in the target dtype tensor by tensor (query
    tokens and Q-Former kept float32 in an fp16 model, as transformers keeps them) -> convert -> resize -> build on meta
    -> fill tied names -> strict load -> re-tie -> device."""
    if kind is not None and kind not in BLIP2_KIND_TASKS:
        raise CheckpointError(
            f"{source} is a BLIP-2 checkpoint: kind must be one of {', '.join(BLIP2_KIND_TASKS)}, not {kind!r}"
        )
    folder = path if path.is_dir() else path.parent
    weights_path = _weights_file(path) if path.is_dir() else path
    origin = str(folder / "config.json")
    if isinstance(config, Blip2Config):
        config, origin = (config.replace(kind=kind) if kind else config), "config"
    elif config is not None:
        given = Path(config).expanduser()
        config, origin = read_blip2_config(given / "config.json" if given.is_dir() else given, kind), str(given)
    elif (folder / "config.json").is_file():
        config = read_blip2_config(folder / "config.json", kind)
    else:
        raise CheckpointError(f"{source}: a BLIP-2 checkpoint needs its config.json (none in {folder})")
    try:
        config = blip2_inference_config(config).validate()
        if image_size is not None:
            config = config.replace(vision=dataclasses.replace(config.vision, image_size=image_size)).validate()
    except ConfigError as e:
        raise CheckpointError(f"{origin}: {e}") from e

    target = dtype or torch.float32

    def dtype_of(key: str) -> torch.dtype:
        # transformers keeps the query tokens, the Q-Former and T5's feed-forward `wo` in fp32 for fp16 only
        # (`_keep_in_fp32_modules`); bf16 casts everything.
        return torch.float32 if target == torch.float16 and keeps_fp32(key) else target

    state = _read_blip2_weights(weights_path, dtype_of)
    try:
        state = convert.convert_hf_blip2(state)
    except ValueError as e:
        raise CheckpointError(f"{weights_path}: {e}") from e
    if config.kind == "t5":  # the weights decide whether the head is tied, as in transformers
        config, state = _resolve_t5(config, state, weights_path)
    report = LoadReport(str(source), str(weights_path), "hf")
    if POS_EMBED in state and state[POS_EMBED].shape[1] != config.vision.num_positions:
        old = state[POS_EMBED].shape[1] - 1
        state[POS_EMBED] = resize_pos_embed(state[POS_EMBED], config.vision.grid_size)
        report.resized_position_embedding = (old, config.vision.num_positions - 1)
    with torch.device("meta"), _skip_random_init():
        model = Blip2Model(config)
    groups = convert.tied_groups(model)
    state = convert.fill_tied(state, groups)
    state = {k: _cast(v, dtype_of(k)) for k, v in state.items()}
    check_keys(model, state, str(weights_path), f"a {config.kind!r} BLIP-2 model ({origin})")
    model.load_state_dict(state, strict=True, assign=True)
    retie(model, groups)
    model.eval().to(device)
    return Loaded(model, report, folder)


def _resolve_t5(
    config: Blip2Config, state: dict[str, torch.Tensor], weights_path: Path
) -> tuple[Blip2Config, dict[str, torch.Tensor]]:
    from blip.models.blip2.t5 import hf_t5_state_dict

    prefix = "language_model."
    try:
        lm_state, text = hf_t5_state_dict(state, config.text, prefix=prefix)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{weights_path}: {str(e).strip(chr(34) + chr(39))}") from e
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    state.update({prefix + k: v for k, v in lm_state.items()})
    return config.replace(text=text), state


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def _read_blip2_weights(path: Path, dtype_of: Callable[[str], torch.dtype]) -> dict[str, torch.Tensor]:
    """safetensors (one file or a sharded index) read tensor by tensor in the target dtype; torch files whole."""
    if path.name.endswith(".index.json"):
        state: dict[str, torch.Tensor] = {}
        for shard in index_shards(path):
            state.update(_read_blip2_weights(shard, dtype_of))
        return state
    if path.suffix == ".safetensors":
        return read_safetensors(path, dtype_of)
    contents = read_torch_file(path, mmap=True)
    try:
        return convert.unwrap_state_dict(contents)
    except ValueError as e:
        raise CheckpointError(f"{path} is a PyTorch file but not a model: {e}; {EXPECTED}") from e


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Make each tied group one Parameter again (`load_state_dict(assign=True)` assigns each name its own)."""
    for keep, *others in groups:
        param = model.get_parameter(keep)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)


def save_blip2(model: Blip2Model, folder: str | os.PathLike) -> None:
    """Write `config.json` + `model.safetensors` as transformers' `save_pretrained` does (one name per tie)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    state = convert.drop_tied(model.state_dict(), convert.tied_groups(model))
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


# --- tokenizer -------------------------------------------------------------------------------------------------------


def load_tokenizer(
    loaded: Loaded, tokenizer: str | os.PathLike | None = None, source: str | os.PathLike = ""
) -> BlipTokenizer:
    """The tokenizer for a loaded model: `tokenizer` when given (a folder, a vocab file or a hub id), else the one
    in the checkpoint, beside the weights, or bert-base-uncased (what original `.pth` files were trained with).
    One whose ids do not fit the model's vocabulary is refused."""
    source = source or loaded.report.source
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        result = _tokenizer_from(path if path.exists() else locate(tokenizer))
    elif loaded.tokenizer_files is not None:
        result = checkpoint.tokenizer_from_dict(loaded.tokenizer_files, source=str(source))
    elif loaded.folder is not None and any((loaded.folder / n).exists() for n in ("tokenizer.json", "vocab.txt")):
        result = _tokenizer_from(loaded.folder)
    else:
        try:
            result = BlipTokenizer.from_pretrained(locate(DEFAULT_TOKENIZER_SOURCE))
        except Exception as e:
            raise CheckpointError(
                f"{source} ships no tokenizer (no tokenizer.json or vocab.txt in {loaded.folder}) and the "
                f"default bert-base-uncased tokenizer from {DEFAULT_TOKENIZER_SOURCE} is not available: "
                f"pass tokenizer=<folder or vocab.txt> (--tokenizer)"
            ) from e
    vocab = loaded.model.config.text.vocab_size
    if result.vocab_size > vocab:
        raise CheckpointError(
            f"the tokenizer has {result.vocab_size} tokens but the model {source} has a vocabulary of {vocab}: "
            f"pass the tokenizer it was trained with (tokenizer=, --tokenizer)"
        )
    return result


def _tokenizer_from(path: Path) -> BlipTokenizer:
    try:
        return BlipTokenizer.from_pretrained(path)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from e


# --- save ------------------------------------------------------------------------------------------------------------


def save_model(model: BlipModel, folder: str | os.PathLike) -> None:
    """Write `config.json` + `model.safetensors` in the layout transformers' `from_pretrained` reads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    state = convert.to_hf(model.state_dict())
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
