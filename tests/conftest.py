from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from oracle import TinySpec, build_hf_checkpoint  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _blip_cache_dir(tmp_path_factory):
    """Checkpoint fingerprints are cached under BLIP_CACHE_DIR: a temporary one, not the user's ~/.cache/blip."""
    patch = pytest.MonkeyPatch()
    patch.setenv("BLIP_CACHE_DIR", str(tmp_path_factory.mktemp("blip-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Factory: a transformers-made random-weight checkpoint folder per spec, built once per session."""
    made: dict[str, Path] = {}

    def make(spec: TinySpec | None = None, **kwargs) -> Path:
        spec = spec or TinySpec(**kwargs)
        key = repr(spec)
        if key not in made:
            made[key] = build_hf_checkpoint(tmp_path_factory.mktemp(f"hf_{spec.kind}"), spec)
        return made[key]

    return make
