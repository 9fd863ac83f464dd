"""Export for runtimes outside PyTorch: `export(m, out, format="onnx")` writes the parts a runtime needs and a
manifest; `blip.export.onnx_runtime.OnnxBlip` captions and answers with them (numpy + onnxruntime, no torch).

Nothing here is imported by `import blip`; the exporter imports torch and onnx when called, the runner onnxruntime.
Both come with the `[onnx]` extra (`pip install 'blip-vl[onnx]'`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blip.api import Blip

FORMATS = ("onnx",)
# shared by the exporter (blip.export.onnx) and the torch-free runner (blip.export.onnx_runtime)
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "blip-onnx"
INSTALL_HINT = "pip install 'blip-vl[onnx]'"


def kv_names(prefix: str, layers: int) -> list[str]:
    """The graphs' per-layer K/V input/output names (`past`, `present`, `cross`): key_0, value_0, key_1, ..."""
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


DTYPES = ("float32", "float16")


class ExportError(ValueError):
    """A request the exporter cannot carry out (unsupported format, part, dtype or model), in one line."""


def check_request(format: str, dtype: str) -> None:
    """ExportError for a format or dtype the exporter does not write (checked before any model is loaded)."""
    if format not in FORMATS:
        raise ExportError(f"unsupported export format {format!r}: use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unsupported export dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def export(
    model: Blip,
    out: str | os.PathLike,
    *,
    format: str = "onnx",
    dtype: str = "float32",
    parts: list[str] | tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Export `model` to `out` in `format` (only "onnx"); returns the manifest written as `out/manifest.json`."""
    check_request(format, dtype)
    from blip.export.onnx import export_onnx

    return export_onnx(model, out, dtype=dtype, parts=parts)
