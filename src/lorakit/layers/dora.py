"""DoRA (Liu et al., 2024) as a variant: the adapted weight is m * (W + s·B·A) / ||W + s·B·A||, norms per output row.

The magnitude m is one extra parameter per adapter (`lora_magnitude`, file key `lora_magnitude_vector`,
as PEFT names it). The norm is treated as a constant in backward (detached), as the paper suggests. It is
computed from r x r and (out, r) products instead of forming the (out, in) matrix W + s·B·A:
||W_i + s·(BA)_i||² = ||W_i||² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·B_i (A Aᵀ) B_iᵀ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import inplace_autograd
from .variant import Variant, register

if TYPE_CHECKING:
    from .core import AdapterSpec, LoraLayer


class Dora(Variant):
    """Rescales the base output and the LoRA term by g = m / ||W + s·B·A|| per output row."""

    name = "dora"
    parameter_dicts = ("lora_magnitude",)
    file_keys = {"lora_magnitude_vector": "lora_magnitude"}
    merges_against_base = True  # g is relative to the unmerged weight
    inplace_alone = True  # the in-place path rescales the whole output, base included

    def selects(self, spec: AdapterSpec) -> bool:
        return spec.use_dora

    def check(self, layer_class: type, spec: AdapterSpec) -> str | None:
        if not getattr(layer_class, "lora_is_linear", False) or spec.groups is not None:
            return f"use_dora: DoRA applies to linear layers only, not {layer_class.__name__}"
        return None

    def add(self, layer: LoraLayer, name: str, spec: AdapterSpec, dtype: torch.dtype) -> None:
        weight = layer.lora_reference_weight()
        norms = layer.lora_dense_weight().detach().float().norm(dim=1)  # B = 0: m starts at ||W||
        layer.lora_magnitude[name] = nn.Parameter(norms.to(device=weight.device, dtype=dtype))

    def can_inplace(self, spec: AdapterSpec) -> bool:
        return spec.groups is None

    def add_inplace_(self, layer: LoraLayer, name: str, out: Tensor, x: Tensor, base: Tensor) -> Tensor:
        spec, A, B = layer.lora_adapters[name], layer.lora_A[name], layer.lora_B[name]
        if (spec.dropout and layer.training) or out.dtype != inplace_autograd.compute_dtype(x, A):
            # with dropout DoRA rescales W·dropout(x), which only the general path computes
            return super().add_inplace_(layer, name, out, x, base)
        return inplace_autograd.add_dora_(out, x, A, B, spec.scaling, layer.lora_magnitude[name],
                                          self.weight_norm(layer, name), getattr(layer, "bias", None))

    def term(self, layer: LoraLayer, name: str, x: Tensor, lora: Tensor, base: Tensor | None,
             dropped: bool) -> Tensor:
        if dropped or base is None:  # with dropout, PEFT rescales W·dropout(x)
            base_no_bias = F.linear(x, layer.lora_dense_weight().to(x.dtype))
        else:
            bias = getattr(layer, "bias", None)
            base_no_bias = base if bias is None else base - bias.to(base.dtype)
        return output(base_no_bias, lora, layer.lora_magnitude[name], self.weight_norm(layer, name))

    def merged_update(self, layer: LoraLayer, name: str, weight: Tensor, delta: Tensor) -> tuple[Tensor, Tensor | None]:
        spec, A, B = layer.lora_adapters[name], layer.lora_A[name].detach(), layer.lora_B[name].detach()
        scale = layer.lora_magnitude[name].detach().float() / weight_norm(weight, A, B, spec.scaling)
        return merged_delta(weight, delta, scale), scale

    def weight_norm(self, layer: LoraLayer, name: str) -> Tensor:
        """||W + s·B·A|| per output row; reused while W, A and B are unchanged (e.g. in inference)."""
        A, B = layer.lora_A[name], layer.lora_B[name]
        key = (A._version, B._version, layer.lora_reference_weight()._version, A.data_ptr(), B.data_ptr())
        cached = layer.lora_cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        norm = weight_norm(layer.lora_dense_weight(), A.detach(), B.detach(), layer.lora_adapters[name].scaling)
        layer.lora_cache[name] = (key, norm)
        return norm


@torch.no_grad()
def weight_norm(weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Row norms of weight + scaling·B·A, shape (out,), in float32; weight is (out, in)."""
    W, A, B = weight.float(), A.float(), B.float()
    cross = (B * (W @ A.T)).sum(1)
    lora = ((B @ (A @ A.T)) * B).sum(1)
    squared = W.pow(2).sum(1) + 2 * scaling * cross + scaling**2 * lora
    return squared.clamp_min(0).sqrt()


def output(base_no_bias: Tensor, lora: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """What DoRA adds to the base output: (g - 1)·W·x + g·s·B·A·x with g = m / ||W + s·B·A||."""
    g = (magnitude / norm).to(lora.dtype)
    return (g - 1) * base_no_bias.to(lora.dtype) + g * lora


def merged_delta(weight: Tensor, delta: Tensor, scale: Tensor) -> Tensor:
    """The additive form of a DoRA merge: (g - 1)·W + g·ΔW, rows scaled by g (all (out, in))."""
    return (scale[:, None] - 1) * weight + scale[:, None] * delta


DORA = register(Dora())
