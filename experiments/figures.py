"""The study's figures (matplotlib, headless), drawn from the loaded results by make_docs.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import study
from outcomes import accuracies, finished, picked_lr

CURVES = ("full", "lora-qv-r8", "qlora-all-r8")  # the training curves compared


def draw_all(results: Any, folder: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for draw, name in zip((rank_figure, params_figure, curves_figure), names):
        fig = draw(results)
        fig.tight_layout()
        fig.savefig(folder / name, metadata={"Software": None})
        plt.close(fig)


def _accuracy(results: Any, name: str) -> tuple[float, float] | None:
    values = accuracies(results, name)
    if not values:
        return None
    mean, std = study.mean_std(values)
    return 100 * mean, 100 * std


def _references(ax: Any, results: Any) -> None:
    if results.zero_shot:
        ax.axhline(100 * results.zero_shot["metrics"]["accuracy"], color="grey", ls=":", label="zero-shot")
    full = _accuracy(results, "full")
    if full:
        ax.axhline(full[0], color="tab:red", ls="--", label="full fine-tuning")


def rank_figure(results: Any) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    points = [(c.settings["r"], _accuracy(results, c.name)) for c in study.RANK_SWEEP]
    points = [(r, a) for r, a in points if a]
    if points:
        ax.errorbar([r for r, _ in points], [a[0] for _, a in points], yerr=[a[1] for _, a in points],
                    marker="o", capsize=3, label="LoRA on q,v (mean ± std over seeds)")
    _references(ax, results)
    ax.set_xscale("log", base=2)
    ax.set_xticks([c.settings["r"] for c in study.RANK_SWEEP], [str(c.settings["r"]) for c in study.RANK_SWEEP])
    ax.set_xlabel("rank r")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Accuracy against rank" + ("" if points else " (not run yet)"))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def params_figure(results: Any) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    configs = {c.name: c for c in [*study.METHODS, *study.RANK_SWEEP, *study.BUDGET]}
    drawn = 0
    for name, config in configs.items():
        runs, accuracy = finished(results, name), _accuracy(results, name)
        if not runs or not accuracy:
            continue
        ax.errorbar(runs[0]["trainable"], accuracy[0], yerr=accuracy[1], marker="o", capsize=3,
                    color="tab:red" if name == "full" else "tab:blue")
        ax.annotate(config.label, (runs[0]["trainable"], accuracy[0]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
        drawn += 1
    if results.zero_shot:
        ax.axhline(100 * results.zero_shot["metrics"]["accuracy"], color="grey", ls=":", label="zero-shot")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Accuracy against trainable parameters" + ("" if drawn else " (not run yet)"))
    ax.grid(alpha=0.3)
    return fig


def _smoothed(values: list[float], window: int = 5) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def curves_figure(results: Any) -> Any:
    """Left: training loss (5-step moving average, mean over seeds) of the held-out runs; right: validation
    accuracy during the sweep run at each method's picked lr."""
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    labels = {c.name: c.label for c in study.METHODS}
    for name in CURVES:
        runs = finished(results, name)
        if runs:
            losses = [[h["loss"] for h in r["history"] if h.get("loss") is not None] for r in runs]
            n = min(len(l) for l in losses)
            mean = [sum(l[i] for l in losses) / len(losses) for i in range(n)]
            loss_ax.plot(range(1, n + 1), _smoothed(mean), label=f"{labels[name]} ({len(runs)} seeds)")
        lr, _ = picked_lr(results, name)
        sweep = results.sweep.get(name, {}).get(lr) if lr else None
        if sweep:
            points = [(h["step"], 100 * h["accuracy"]) for h in sweep["history"] if "accuracy" in h]
            points.append((sweep["steps"], 100 * sweep["after"]["accuracy"]))
            acc_ax.plot(*zip(*points), marker="o", label=f"{labels[name]} (lr {lr:g})")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("training loss (5-step mean)")
    loss_ax.set_title("Training loss")
    acc_ax.set_xlabel("optimizer step")
    acc_ax.set_ylabel("validation accuracy (%)")
    acc_ax.set_title("Validation accuracy (lr sweep, seed 0)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig
