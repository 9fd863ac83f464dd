"""blip: BLIP (Bootstrapping Language-Image Pre-training) in plain PyTorch, exact with the published checkpoints.

import blip
m = blip.load("Salesforce/blip-image-captioning-base")
m.caption("photo.jpg")[0].text

The names below are imported on first use, so `import blip` (and the `blip` command) start without importing torch:
the command line sets up the process (e.g. OpenMP's wait policy, see `blip.cli`) before torch is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
_EXPORTS = {
    "Answer": "blip.tasks.common",
    "Blip": "blip.api",
    "Blip2": "blip.api",
    "Blip2Config": "blip.blip2_config",
    "BlipConfig": "blip.config",
    "Caption": "blip.tasks.common",
    "TextConfig": "blip.config",
    "Verdict": "blip.tasks.common",
    "VisionConfig": "blip.config",
    "create_model": "blip.api",
    "get_preset": "blip.config",
    "list_pretrained": "blip.weights.registry",
    "load": "blip.api",
}
__all__ = [
    "Answer",
    "Blip",
    "Blip2",
    "Blip2Config",
    "BlipConfig",
    "Caption",
    "TextConfig",
    "Verdict",
    "VisionConfig",
    "create_model",
    "get_preset",
    "list_pretrained",
    "load",
    "__version__",
]

if TYPE_CHECKING:
    from blip.api import Blip, Blip2, create_model, load
    from blip.blip2_config import Blip2Config
    from blip.config import BlipConfig, TextConfig, VisionConfig, get_preset
    from blip.tasks.common import Answer, Caption, Verdict
    from blip.weights.registry import list_pretrained


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blip' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
