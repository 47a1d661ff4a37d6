"""Plain LoRA (Hu et al., 2021) as a variant: the term s·B·A·x alone, merged as W + s·B·A."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from . import inplace_autograd
from .variant import PLAIN, Variant, register

if TYPE_CHECKING:
    from .core import AdapterSpec, LoraLayer


class PlainLora(Variant):
    """No extra parameters; the in-place path adds the term into the base output with one addmm."""

    name = PLAIN

    def selects(self, spec: AdapterSpec) -> bool:
        return True

    def can_inplace(self, spec: AdapterSpec) -> bool:
        return spec.groups is None  # fused parts expand per part, which only the general path does

    def can_fuse(self, spec: AdapterSpec) -> bool:
        return spec.groups is None

    def add_inplace_(self, layer: LoraLayer, name: str, out: Tensor, x: Tensor, base: Tensor) -> Tensor:
        spec = layer.lora_adapters[name]
        dropout = spec.dropout if layer.training else 0.0
        return inplace_autograd.add_lora_(out, x, layer.lora_A[name], layer.lora_B[name], spec.scaling, dropout)


PLAIN_LORA = register(PlainLora())
