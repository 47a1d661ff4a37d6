"""Training curves as a PNG beside the metrics (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(history: list[dict[str, Any]], path: Path, title: str,
                before: dict[str, float] | None = None, after: dict[str, float] | None = None) -> Path | None:
    """Loss per step on the left axis, evaluation accuracy (with the baseline and the final figure) on the
    right."""
    steps = [h["step"] for h in history if "loss" in h]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], color="tab:blue", lw=1.2, label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss", color="tab:blue")
    evals = [(h["step"], h["accuracy"]) for h in history if "accuracy" in h]
    if before and "accuracy" in before:
        evals = [(0, before["accuracy"]), *evals]
    if after and "accuracy" in after and steps[-1] not in {s for s, _ in evals}:
        evals = [*evals, (steps[-1], after["accuracy"])]
    if evals:
        acc = ax.twinx()
        acc.plot(*zip(*evals), color="tab:orange", marker="o", label="test accuracy")
        acc.set_ylabel("test accuracy", color="tab:orange")
        acc.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
