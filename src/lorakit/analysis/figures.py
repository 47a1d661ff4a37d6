"""PNG figures of an analysis (matplotlib, headless): φ heatmaps like the LoRA paper's Figure 3, spectra."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .adapter import AdapterAnalysis, LayerAnalysis


def pick_layers(layers: list[LayerAnalysis], per_kind: int = 4) -> dict[str, list[LayerAnalysis]]:
    """Up to `per_kind` layers of each module kind (q_proj, v_proj, ...), evenly spaced in depth."""
    kinds: dict[str, list[LayerAnalysis]] = defaultdict(list)
    for layer in layers:
        kinds[layer.module.rsplit(".", 1)[-1]].append(layer)
    picked = {}
    for kind, members in kinds.items():
        if len(members) <= per_kind:
            picked[kind] = members
        else:
            step = (len(members) - 1) / (per_kind - 1)
            picked[kind] = [members[round(i * step)] for i in range(per_kind)]
    return picked


def plot_similarity(analysis: AdapterAnalysis, out_dir: Path, which: str = "A") -> list[Path]:
    """One PNG per module kind: φ(i, j) for the picked layers, with a zoom on j <= rank of the first adapter
    when the second is wider (as Figure 3 of the paper). `which`: "A" (the A matrices) or "delta" (ΔW)."""
    plt = _pyplot()
    written = []
    for kind, layers in pick_layers([x for x in analysis.layers if x.similarity_A is not None]).items():
        grids = [x.similarity_A if which == "A" else x.similarity_delta for x in layers]
        zoom = grids[0].shape[1] > grids[0].shape[0]
        rows = 2 if zoom else 1
        fig, axes = plt.subplots(rows, len(layers), figsize=(3.2 * len(layers), 2.4 * rows), dpi=120, squeeze=False)
        for column, (layer, grid) in enumerate(zip(layers, grids)):
            views = [(grid, "")] + ([(grid[:, :grid.shape[0]], f" (j <= {grid.shape[0]})")] if zoom else [])
            for row, (view, note) in enumerate(views):
                ax = axes[row][column]
                image = ax.imshow(view.float().numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                                  interpolation="nearest",  # one flat cell per (i, j): exact and small PNGs
                                  origin="upper", extent=(0.5, view.shape[1] + 0.5, view.shape[0] + 0.5, 0.5))
                ax.set_title(_short(layer.module) + note, fontsize=8)
                ax.set_xlabel(f"j ({analysis.other})", fontsize=7)
                ax.set_ylabel(f"i ({analysis.adapter})", fontsize=7)
                ax.tick_params(labelsize=6)
        fig.subplots_adjust(hspace=0.55, wspace=0.35)
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="φ(i, j)")
        what = "A matrices" if which == "A" else "ΔW (right singular vectors)"
        fig.suptitle(f"subspace similarity φ, {kind}, {what}: {analysis.adapter} vs {analysis.other}", fontsize=9)
        written.append(_save(plt, fig, out_dir / f"similarity_{which}_{kind}.png"))
    return written


def plot_spectra(analysis: AdapterAnalysis, out_dir: Path) -> Path:
    """Normalized singular values σ_k / σ_1 of ΔW for the picked layers, one panel per module kind."""
    plt = _pyplot()
    picked = pick_layers(analysis.layers)
    fig, axes = plt.subplots(1, len(picked), figsize=(3.4 * len(picked), 3), dpi=120, squeeze=False)
    for ax, (kind, layers) in zip(axes[0], picked.items()):
        for layer in layers:
            s = layer.singular_values.float()
            if len(s) and float(s[0]) > 0:
                ax.semilogy(range(1, len(s) + 1), (s / s[0]).clamp_min(1e-8).numpy(), marker=".", lw=1,
                            label=_short(layer.module))
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("k", fontsize=8)
        ax.set_ylabel("σ_k / σ_1", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"singular spectra of ΔW, adapter {analysis.adapter}", fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, out_dir / "spectra.png")


def _short(module: str) -> str:
    """'model.layers.12.self_attn.q_proj' -> 'layers.12.q_proj'."""
    parts = module.split(".")
    numbered = [i for i, p in enumerate(parts) if p.isdigit()]
    return f"{parts[numbered[-1] - 1]}.{parts[numbered[-1]]}.{parts[-1]}" if numbered else module


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
