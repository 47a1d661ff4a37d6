"""lk.resize: an adapter cut to a smaller rank in place, per layer the best approximation of its ΔW.

The SVD comes from the factors (QR of B and Aᵀ, SVD of an r x r core), never from the dense update.
A DoRA adapter keeps its magnitude vector and has its direction's update s·B·A truncated: it stays a DoRA
adapter with the same row norms, and the report's energies are those of s·B·A.
"""

from __future__ import annotations

from torch import nn

from ..state import lora_layers
from .build import check_source, replace_with_updates
from .dora import check_base_unmerged, is_dora
from .factors import Update, check_target, chosen_rank, direction_update, factored_svd
from .report import LayerReport, RankReport


def resize(model: nn.Module, adapter: str, rank: int | None = None, energy: float | None = None) -> RankReport:
    """Keep each layer's top `rank` directions, or the fewest keeping `energy` of ||ΔW||_F² (e.g. 0.95)
    (for DoRA: of its direction's update s·B·A, with the magnitude vector kept).

    The adapter keeps its name, active and trainable state; its layers get scaling 1 (alpha = rank) and
    a rank_pattern where ranks differ. The report gives, per layer, exactly the share of ||ΔW||_F² kept.
    """
    check_target(rank, energy)
    check_source(model, adapter)
    dora = is_dora(model, adapter)
    if dora:
        check_base_unmerged(model, adapter)
    method = f"resize rank={rank}" if rank is not None else f"resize energy={energy}"
    updates: dict[str, Update] = {}
    report = RankReport(adapter=adapter, method=method + (" (DoRA: direction s·B·A, magnitude kept)" if dora else ""))
    for module, layer in lora_layers(model):
        if adapter not in layer.lora_adapters:
            continue
        update = direction_update(layer, adapter)
        spectrum = factored_svd(update)
        keep = chosen_rank(spectrum, rank, energy)
        norm = float(spectrum.S.pow(2).sum().sqrt())
        report.layers.append(LayerReport(module, update.rank, keep, norm,
                                         spectrum.kept_fraction(keep)))
        updates[module] = spectrum.truncated(keep)
    replace_with_updates(model, adapter, updates)
    return report
