"""Merging adapters back into 4-bit weights: requantize W + ΔW, and say how much error that adds.

Unlike a 16-bit merge this is not exact: W + ΔW has to be rounded to 16 NF4/FP4 levels per block again,
and that rounding is often larger than ΔW itself. So it runs only when asked, and its report puts the
added error next to the size of the update it was meant to keep.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import LorakitError
from .linear4bit import Linear4bit
from .tensor import QuantizedTensor, quantize

logger = logging.getLogger("lorakit.quant")


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return 0.0 if numerator == 0 else math.inf
    return numerator / denominator


@dataclass(frozen=True)
class LayerMerge:
    """Frobenius norms for one 4-bit layer: the merged target W + ΔW, the update ΔW, and the requantization
    error Q(W + ΔW) - (W + ΔW), where W is the layer's dequantized 4-bit weight."""

    name: str
    shape: tuple[int, int]
    target_norm: float
    delta_norm: float
    error_norm: float

    @property
    def relative_error(self) -> float:
        """||Q(W + ΔW) - (W + ΔW)|| / ||W + ΔW||: the error requantization adds, relative to the weight."""
        return _ratio(self.error_norm, self.target_norm)

    @property
    def error_to_delta(self) -> float:
        """||Q(W + ΔW) - (W + ΔW)|| / ||ΔW||: above 1, the rounding is larger than the update it folds in."""
        return _ratio(self.error_norm, self.delta_norm)

    @property
    def delta_to_weight(self) -> float:
        """||ΔW|| / ||W + ΔW||: how large the adapters' update is."""
        return _ratio(self.delta_norm, self.target_norm)


@dataclass(frozen=True)
class MergeReport:
    """What `merge_into_4bit` did: one row per requantized layer, and the same figures over all of them."""

    adapters: tuple[str, ...]
    layers: tuple[LayerMerge, ...]

    def _total(self, field: str) -> float:
        return math.sqrt(sum(getattr(layer, field) ** 2 for layer in self.layers))

    @property
    def relative_error(self) -> float:
        """Over all requantized layers: ||Q(W + ΔW) - (W + ΔW)|| / ||W + ΔW||."""
        return _ratio(self._total("error_norm"), self._total("target_norm"))

    @property
    def error_to_delta(self) -> float:
        """Over all requantized layers: ||Q(W + ΔW) - (W + ΔW)|| / ||ΔW||."""
        return _ratio(self._total("error_norm"), self._total("delta_norm"))

    @property
    def delta_to_weight(self) -> float:
        return _ratio(self._total("delta_norm"), self._total("target_norm"))

    def __str__(self) -> str:
        header = ["layer", "out x in", "|ΔW| / |W+ΔW|", "added error / |W+ΔW|", "added error / |ΔW|"]
        rows = [[m.name, "x".join(map(str, m.shape)), *_figures(m)] for m in self.layers]
        rows.append([f"all {len(self.layers)} layers", "", *_figures(self)])
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                 for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * width for width in widths))
        lines.append(f"adapters {', '.join(self.adapters)} merged into 4 bits: requantizing added a relative "
                     f"error of {self.relative_error:.4f}, {self.error_to_delta:.2f}x the size of the update")
        return "\n".join(lines)


def _figures(item: LayerMerge | MergeReport) -> list[str]:
    return [f"{item.delta_to_weight:.4f}", f"{item.relative_error:.4f}", f"{item.error_to_delta:.3g}"]


def merge_into_4bit(model: nn.Module) -> MergeReport:
    """Fold the active adapters into the model's 4-bit layers, which stay 4-bit, and remove every lorakit
    layer as `lk.unload(model, merge=True)` does; returns the error the requantization added.

    Each 4-bit layer is dequantized to float32, gets ΔW added (DoRA adapters as their merged form), and is
    quantized again with its own quant type, block size and double quantization. Nothing is changed if a
    result would not be finite. For an exact merge use `lk.unload(model, merge=True, dequantize=True)`,
    which returns 16-bit layers instead.
    """
    from ..adapters import check_mergeable, unload
    from ..state import get_state, lora_layers

    state = get_state(model)
    if not state.active:
        raise LorakitError("no adapter is active, so there is nothing to merge; lk.set_active(model, name) first")
    layers = [(name, layer) for name, layer in lora_layers(model) if isinstance(layer, Linear4bit)]
    if not layers:
        raise LorakitError("the model has no 4-bit layers with adapters; merge with lk.unload(model, merge=True)")
    check_mergeable(model, skip={name for name, _ in layers})  # the dense layers that unload merges below
    merged = [_requantize(name, layer, state.active) for name, layer in layers]
    for (_, layer), (qt, _) in zip(layers, merged):
        layer.lora_teardown()
        layer._set_quantized(qt)
    report = MergeReport(state.active, tuple(row for _, row in merged if row is not None))
    unload(model, merge=True)
    logger.info("lorakit: %s", report)
    return report


def _requantize(name: str, layer: Linear4bit, active: tuple[str, ...]) -> tuple[QuantizedTensor, LayerMerge | None]:
    """The layer's new 4-bit weight and its figures (None: no active adapter here, the weight is kept)."""
    live = [adapter for adapter in active if adapter in layer.lora_adapters]
    if not live:
        return layer.quantized_weight, None
    weight = layer.dequantize_weight(torch.float32)
    delta, _ = layer.lora_merged_update(live, weight)
    target = weight + delta
    if not torch.isfinite(target).all():
        raise LorakitError(f"merging into {name} gives non-finite weights (W + ΔW overflows float32); nothing was "
                           "changed: keep the adapter unmerged")
    old = layer.quantized_weight
    qt = replace(quantize(target, old.quant_type, old.blocksize, old.double_quant), dtype=old.dtype)
    error = qt.dequantize(torch.float32).sub_(target)
    row = LayerMerge(name, tuple(target.shape), float(target.norm()), float(delta.norm()), float(error.norm()))
    return qt, row
