"""One load pipeline: locate -> read -> convert -> resize position embeddings -> strict load -> report.

Sources: a local Hugging Face folder (config.json + safetensors or pytorch_model.bin), a hub id (via
huggingface_hub, cached; offline use when cached), a single weights file (original Salesforce `.pth`, or an HF
state dict), or a short registry name (`caption-base`). Loading is strict: every parameter must be present with
the right shape, and anything left over is an error naming the keys, except the original files' training-only
state, which is dropped and reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from blip.config import BlipConfig
from blip.models.blip import BlipModel
from blip.models.vit import resize_pos_embed
from blip.weights import convert
from blip.weights.registry import HUB_FILES, resolve_name

_logger = logging.getLogger(__name__)

POS_EMBED = "vision_model.embeddings.position_embedding"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or matched to the model; the message names the file or keys."""


@dataclass
class LoadReport:
    source: str
    weights_file: str
    layout: str  # "hf" or "salesforce"
    dropped_keys: list[str] = field(default_factory=list)
    resized_position_embedding: tuple[int, int] | None = None  # (old patches, new patches)


def locate(source: str | os.PathLike) -> Path:
    """A local folder or file for `source`, downloading hub checkpoints into the local cache first."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if text.startswith((".", "/", "~")) or text.endswith((".pth", ".pt", ".bin", ".safetensors")):
        raise CheckpointError(f"checkpoint not found: {path} does not exist")
    return _download(resolve_name(text))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a core dependency
        raise CheckpointError(f"loading {repo_id!r} from the hub needs huggingface_hub") from e
    patterns = [p for p in HUB_FILES if not p.startswith("pytorch_model")]
    errors = []
    for local_only in (False, True):
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
            if not any((folder / f).exists() for f in WEIGHT_FILES):
                folder = Path(
                    snapshot_download(repo_id, allow_patterns=["pytorch_model.bin*"], local_files_only=local_only)
                )
            return folder
        except Exception as e:  # network errors, missing repos, offline mode: try the cache, then report both
            errors.append(f"{type(e).__name__}: {e}")
    raise CheckpointError(
        f"cannot load {repo_id!r}: not a local path, and the hub could not provide it "
        f"(nor the local cache). Details: {' | '.join(errors)}"
    )


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).exists():
            return folder / name
    candidates = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pth"))
    if len(candidates) == 1:
        return candidates[0]
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read safetensors, a sharded index, or a torch pickle (weights_only) into a flat state dict."""
    try:
        if path.name.endswith(".index.json"):
            index = json.loads(path.read_text())
            shards = sorted(set(index["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_state_dict(path.parent / shard))
            return state
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) pickles cannot mmap
        return convert.unwrap_state_dict(obj)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def read_config(folder: Path, kind: str | None = None) -> BlipConfig | None:
    path = folder / "config.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if data.get("model_type") not in (None, "blip"):
        raise CheckpointError(f"{path}: model_type {data.get('model_type')!r} is not a BLIP model")
    return BlipConfig.from_hf_dict(data, kind=kind)  # type: ignore[arg-type]


def load_model(
    source: str | os.PathLike,
    *,
    kind: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    config: BlipConfig | str | os.PathLike | None = None,
) -> tuple[BlipModel, Path, LoadReport]:
    """Build the model a checkpoint describes and load it strictly. Returns (model, folder, report).

    `config` (a BlipConfig or an HF config.json) overrides the checkpoint's own or, for an original `.pth` that
    has none, replaces what is inferred from tensor shapes (which assumes 64-wide attention heads)."""
    path = locate(source)
    folder = path if path.is_dir() else path.parent
    weights_path = _weights_file(path) if path.is_dir() else path
    if config is not None and not isinstance(config, BlipConfig):
        config_path = Path(config)
        config = read_config(config_path if config_path.is_dir() else config_path.parent, kind)
        if config is None:
            raise CheckpointError(f"no config.json at {config_path}")
    elif config is None and (path.is_dir() or path.suffix == ".safetensors"):
        config = read_config(folder, kind)

    raw = read_state_dict(weights_path)
    layout = "salesforce" if convert.is_salesforce_layout(raw) else "hf"
    try:
        state, dropped = convert.convert_state_dict(raw)
        if config is None:
            config = convert.infer_config(state, kind)
        elif config.kind is None:  # a config.json without `architectures`: the weights tell the kind
            config = config.replace(kind=convert.infer_kind(state))
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{weights_path}: unexpected checkpoint layout (missing {e})") from e
    state, dropped = _drop_unused_parts(state, config, dropped)

    report = LoadReport(str(source), str(weights_path), layout, dropped)
    if image_size is not None and image_size != config.vision.image_size:
        config = config.replace(vision=_with_image_size(config, image_size))
    if POS_EMBED in state and state[POS_EMBED].shape[1] != config.vision.num_positions:
        old = state[POS_EMBED].shape[1] - 1
        state[POS_EMBED] = resize_pos_embed(state[POS_EMBED], config.vision.grid_size)
        report.resized_position_embedding = (old, config.vision.num_positions - 1)
        _logger.info("resized position embedding from %d to %d patches", old, config.vision.num_positions - 1)

    target = dtype or torch.float32
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"), _skip_random_init():
        model = BlipModel(config)
    load_strict(model, state, str(weights_path))
    model.eval().to(device)
    return model, folder, report


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


def _with_image_size(config: BlipConfig, image_size: int):
    import dataclasses

    if image_size < config.vision.patch_size:
        raise ValueError(f"image_size {image_size} is smaller than the patch size {config.vision.patch_size}")
    return dataclasses.replace(config.vision, image_size=image_size)


def _drop_unused_parts(
    state: dict[str, torch.Tensor], config: BlipConfig, dropped: list[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """When the caller asked for a smaller kind (e.g. a captioner from a pretrain file), drop the other parts."""
    from blip.config import KIND_PARTS

    parts = KIND_PARTS[config.kind]
    unused = []
    if "text_encoder" not in parts:
        unused.append("text_encoder.")
    if "text_decoder" not in parts:
        unused.append("text_decoder.")
    if "heads" not in parts:
        unused += ["vision_proj.", "text_proj.", "itm_head."]
    if not unused:
        return state, dropped
    kept = {k: v for k, v in state.items() if not k.startswith(tuple(unused))}
    return kept, dropped + sorted(set(state) - set(kept))


def load_strict(model: BlipModel, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True, assign=True)` with an error that names every missing, unexpected or
    mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not match a {model.config.kind!r} BLIP model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True, assign=True)
    if model.text_decoder is not None:
        model.text_decoder.tie_weights()


def save_model(model: BlipModel, folder: str | os.PathLike) -> None:
    """Write `config.json` + `model.safetensors` in the layout transformers' `from_pretrained` reads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    state = convert.to_hf(model.state_dict())
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
