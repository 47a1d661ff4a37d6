"""DoRA sources in adapter arithmetic: the cases with an exact DoRA result, and the effective update otherwise.

A DoRA adapter turns W into W' = m ⊙ (W + ΔV) / ||W + ΔV|| (norms of output rows, ΔV = s·B·A), so its
update D = W' - W = (g - 1)·W + g·ΔV with g = m / ||W + ΔV|| per row, which is full rank in general.
- One source with weight w is exactly a DoRA adapter again: W + w·D = c ⊙ (W + h ⊙ ΔV) per row with
  c = 1 + w·(g - 1) and h = w·g / c, i.e. B' = h ⊙ s·B, A' = A, m' = c·||W + h ⊙ ΔV||. With w = 1 this is
  the source itself. A row where c = 0 (the combined row of W' is a pure multiple of ΔV) has no such form.
- Resizing truncates ΔV and keeps m, so the adapter stays DoRA with the same row norms.
- Two DoRA sources, or DoRA with LoRA, each rescale W + their own update by their own magnitudes: no DoRA
  adapter holds the sum in general. When asked (dora_as_update), each DoRA source counts as its dense D.
All of it needs W itself, so a layer with any adapter merged into its weight is refused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import LorakitError
from ..layers.core import LoraLayer
from ..state import lora_layers
from .factors import WORK_DTYPE, Update, direction_update

MAGNITUDE_KEY = "lora_magnitude_vector"  # DoRA's extra tensor, by its adapter-file key (layers/dora.py)
VANISHING_ROW = 1e-6  # |c| below this: the row of W + w·D has (almost) no W component left


def is_dora(model: nn.Module, name: str) -> bool:
    return any(layer.lora_adapters[name].use_dora for _, layer in lora_layers(model) if name in layer.lora_adapters)


def check_base_unmerged(model: nn.Module, name: str) -> None:
    """DoRA's update depends on W itself, so no adapter may be merged into a weight it adapts."""
    for module, layer in lora_layers(model):
        if name in layer.lora_adapters and layer.lora_merged:
            raise LorakitError(f"{module} has {list(layer.lora_merged)} merged into its weight, and DoRA adapter "
                               f"{name!r} is defined against the unmerged W; call lk.unmerge(model) first")


def magnitude(layer: LoraLayer, name: str) -> Tensor:
    return layer.lora_file_tensors(name)[MAGNITUDE_KEY].detach().to(WORK_DTYPE)


def set_magnitude(layer: LoraLayer, name: str, value: Tensor) -> None:
    target = layer.lora_file_tensors(name)[MAGNITUDE_KEY]
    with torch.no_grad():
        target.copy_(value.reshape(target.shape))


def effective_update(layer: LoraLayer, name: str) -> Tensor:
    """D = W' - W = (g - 1)·W + g·ΔV as a dense float64 (out, in) matrix."""
    W = layer.lora_dense_weight().detach().to(WORK_DTYPE)
    V = direction_update(layer, name).dense()
    g = magnitude(layer, name) / (W + V).norm(dim=1)
    return (g - 1)[:, None] * W + g[:, None] * V


def weighted_source(layer: LoraLayer, name: str, weight: float, module: str) -> tuple[Update, Tensor, float]:
    """(factors with scaling 1, magnitude, ||w·D||_F) of the DoRA adapter whose weight is exactly W + w·D."""
    W = layer.lora_dense_weight().detach().to(WORK_DTYPE)
    direction = direction_update(layer, name)
    V = direction.dense()
    g = magnitude(layer, name) / (W + V).norm(dim=1)
    c = 1 + weight * (g - 1)
    vanishing = (c.abs() < VANISHING_ROW).nonzero().flatten().tolist()
    if vanishing:
        raise LorakitError(
            f"{module}: with weight {weight:g}, rows {vanishing[:5]} of W + w·(W' - W) keep no part of W, and such a "
            "row is no DoRA row m·(W + ΔV)/||W + ΔV||; pass dora_as_update=True with rank=k for a plain LoRA "
            "adapter of the update instead"
        )
    h = weight * g / c
    scaled_V = h[:, None] * V
    new_magnitude = c * (W + scaled_V).norm(dim=1)
    delta_norm = math.sqrt(float(((c - 1)[:, None] * W + c[:, None] * scaled_V).pow(2).sum()))
    return Update(h[:, None] * direction.B, direction.A), new_magnitude, delta_norm
