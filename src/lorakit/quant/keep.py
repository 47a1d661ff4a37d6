"""Opt-in speed for memory: let 4-bit layers keep the dense weight their forward built until their backward.

A QLoRA step normally dequantizes every 4-bit weight twice (forward, and again for the input gradient)
so that no dense copy lives between them. Where memory allows, keeping the forward's copy saves the second
dequantize; the gradients are the same bits either way. The cost is the dense bytes of every kept layer,
held from its forward to its backward, so at most a 16-bit model's worth at the peak of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import LorakitError
from .linear4bit import Linear4bit


@dataclass(frozen=True)
class KeepReport:
    """Which 4-bit layers keep their dense weight, and its bytes (in each layer's compute dtype)."""

    kept: list[str]
    skipped: list[str]
    kept_mb: float


def keep_dequantized(model: nn.Module, max_mb: float | None = None) -> KeepReport:
    """Make the model's Linear4bit layers keep their forward's dense weight for the backward: in module order,
    each layer whose dense bytes (at its `compute_dtype`) still fit in `max_mb` (None: every layer; 0: none,
    the default behaviour). The others are set back to dequantizing again in the backward."""
    if max_mb is not None and not max_mb >= 0:
        raise LorakitError(f"max_mb must be >= 0 or None (no limit), got {max_mb}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise LorakitError("keep_dequantized found no 4-bit layer in the model; quantize it first "
                           "(lk.quantize_model(model, 'nf4'))")
    budget = float("inf") if max_mb is None else max_mb * 2**20
    kept, skipped, used = [], [], 0
    for name, layer in layers:
        size = layer.out_features * layer.in_features * layer.compute_dtype.itemsize
        layer.keep_dequantized = used + size <= budget
        if layer.keep_dequantized:
            kept.append(name)
            used += size
        else:
            skipped.append(name)
    return KeepReport(kept, skipped, used / 2**20)
