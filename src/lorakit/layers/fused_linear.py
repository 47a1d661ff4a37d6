"""The fused LoRA step of a dense projection: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ as one autograd function.

The in-place path (inplace_autograd.py) runs the base layer and the adapter as two autograd nodes, so
backward computes the input gradient twice, g·W in the base node and s·(g·B)·A in the adapter's, and
autograd then adds the two in a third pass over an (N x in) tensor. `LoraLinear` owns both: its backward
computes g·W once and adds s·(g·B)·A into it in place (addmm_), one pass and one (N x in) tensor fewer per
layer, and one autograd node fewer. Its forward is exactly today's: the base addmm, then the rank-r
intermediate and addmm_ of the term into the output, which stays contiguous. Every product with a rank-r
side goes through rank_products.py, which asks the BLAS for it in the layout that runs faster.

A is not stored beside W in one (out + r, in) buffer (x·[W; A]ᵀ giving base output and intermediate in
one GEMM), the way fused GPU kernels do it: with BLAS calls the shared GEMM writes [y | h] side by side,
so y comes back strided (a copy, or a changed output layout for the caller), the one-GEMM input gradient
needs g copied beside s·g·B (the pass it was to save), GPT-2's (in, out) Conv1D weight would itself become
a strided view, and every `.to()`, `load_state_dict(assign=True)` or bfloat16 base with float32 adapters
breaks the alias. What it could save is the (N x r) product x·Aᵀ; see docs/benchmarks.md, part 5.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rank_products import add_rank_term_, grad_a, grad_b, times_b


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                transposed: bool, dtype: torch.dtype) -> Tensor:
    """x·Wᵀ + b + scaling·(x·Aᵀ)·Bᵀ computed in `dtype`; `transposed`: weight stored (in, out), as in Conv1D.

    Differentiable in every tensor that requires grad; without grad it runs the same ops without a node.
    """
    tensors = (x, weight, bias, A, B)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return LoraLinear.apply(x, weight, bias, A, B, scaling, transposed, dtype)
    return _forward(x, weight, bias, A, B, scaling, transposed, dtype)[0]


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
             transposed: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(output, weight in `dtype`, scaled intermediate h = s·x·Aᵀ), by the same ops as the unfused path."""
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    w = weight.to(dtype)
    w_in_out = w if transposed else w.T
    y = torch.mm(x2, w_in_out) if bias is None else torch.addmm(bias.to(dtype), x2, w_in_out)
    h = torch.mm(x2, A.to(dtype).T).mul_(scaling)
    add_rank_term_(y, h, B.to(dtype))
    return y.view(*x.shape[:-1], y.shape[-1]), w, h


class LoraLinear(torch.autograd.Function):
    """Autograd for `lora_linear`: one input gradient g·W + s·(g·B)·A, accumulated in place."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                transposed: bool, dtype: torch.dtype) -> Tensor:
        y, w, h = _forward(x, weight, bias, A, B, scaling, transposed, dtype)
        ctx.save_for_backward(x, w, A, B, h)
        ctx.scaling, ctx.transposed = scaling, transposed
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w, A, B, h = ctx.saved_tensors
        need, dtype = ctx.needs_input_grad, h.dtype
        weight_dtype, bias_dtype = ctx.dtypes
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_h = times_b(g, B.to(dtype)).mul_(ctx.scaling)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype) if need[1] or need[3] else None
        grad_x = grad_w = grad_bias = grad_A = grad_B = None
        if need[0]:
            grad_x = torch.mm(g, w.T if ctx.transposed else w)
            grad_x.addmm_(grad_h, A.to(dtype))
            grad_x = grad_x.view(x.shape).to(x.dtype)
        if need[1]:
            grad_w = (torch.mm(x2.T, g) if ctx.transposed else torch.mm(g.T, x2)).to(weight_dtype)
        if need[2]:
            grad_bias = g.sum(0).to(bias_dtype)
        if need[3]:
            grad_A = grad_a(grad_h, x2).to(A.dtype)
        if need[4]:
            grad_B = grad_b(g, h).to(B.dtype)
        return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None, None
