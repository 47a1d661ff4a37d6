"""DoRA (Liu et al., 2024): the adapted weight is m * (W + s·B·A) / ||W + s·B·A||, norms per output row.

The norm is treated as a constant in backward (detached), as the paper suggests. It is computed from
r x r and (out, r) products instead of forming the (out, in) matrix W + s·B·A:
||W_i + s·(BA)_i||² = ||W_i||² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·B_i (A Aᵀ) B_iᵀ.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
