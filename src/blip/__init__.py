"""blip: BLIP (Bootstrapping Language-Image Pre-training) in plain PyTorch, exact with the published checkpoints.

import blip
m = blip.load("Salesforce/blip-image-captioning-base")
m.caption("photo.jpg")[0].text
"""

from blip.api import Blip, create_model, load
from blip.config import BlipConfig, TextConfig, VisionConfig, get_preset
from blip.tasks.common import Answer, Caption
from blip.weights.registry import list_pretrained

__version__ = "0.1.0"
__all__ = [
    "Answer",
    "Blip",
    "BlipConfig",
    "Caption",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "get_preset",
    "list_pretrained",
    "load",
    "__version__",
]
