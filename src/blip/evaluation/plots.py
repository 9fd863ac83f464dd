"""PNG plots of evaluation results (matplotlib, Agg backend; skipped with a warning without it)."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    return plt


def plot_metrics(metrics: dict[str, float], out_png: str | Path, title: str = "", compare: dict | None = None) -> Path:
    """Bar chart of metrics; with `compare` ({label: metrics}) grouped bars per metric."""
    plt = pyplot()
    if plt is None:
        return Path(out_png)
    series = compare or {"": metrics}
    names = list(next(iter(series.values())))
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) * max(1, len(series))), 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(names))]
        bars = ax.bar(xs, [values.get(n, 0.0) for n in names], width, label=label or None)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_title(title)
    if compare:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_caption_examples(predictions: list[dict[str, Any]], out_png: str | Path, n: int = 8) -> Path | None:
    """A grid of test images with the generated caption and the first reference."""
    plt = pyplot()
    if plt is None or not predictions:
        return None
    from PIL import Image

    rows = predictions[:n]
    cols = min(4, len(rows))
    lines = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(3.2 * cols, 4.4 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        with Image.open(row["image"]) as im:
            ax.imshow(im.convert("RGB"))
        text = f"model: {row['caption']}\nref: {row['references'][0]}"
        ax.set_title("\n".join(textwrap.wrap(text, 34)), fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
