"""PNG plots of training runs (matplotlib, Agg backend; skipped with a warning without it). Plots of evaluation
results: `blip.evaluation.plots`."""

from __future__ import annotations

from pathlib import Path

from blip.evaluation.plots import pyplot
from blip.io import read_jsonl


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Every `*loss` column of metrics.jsonl against the step, plus the learning rate."""
    plt = pyplot()
    path = Path(metrics_jsonl)
    if plt is None or not path.is_file():
        return None
    rows = read_jsonl(path)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    names = sorted({k for r in rows for k in r if k.endswith("loss")})
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        ax.plot(steps, [r.get(name, float("nan")) for r in rows], label=name, lw=1.5 if name == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training losses")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="tab:gray")
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
