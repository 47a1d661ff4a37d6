"""The in-place custom-autograd adapter path: out += s·B·A·dropout(x), written into `out` in place.

Autograd's version of this keeps the dropped input (N x in floats) alive until backward, allocates the
(N x out) adapter term and then a second (N x out) tensor for the sum. `LoraAdd` instead adds the term
into the base output in place (addmm with the scale folded into the rank-r intermediate), and keeps only
what backward needs: the layer input it already shares with the base layer, the tiny (N x r)
intermediate, and with dropout a one-byte-per-element mask instead of the dropped copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rank_products import add_rank_term_, grad_a, grad_b, times_b


def compute_dtype(x: Tensor, A: Tensor) -> torch.dtype:
    """Autocast's dtype when autocast is on (as F.linear would use), else the adapter's own dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return A.dtype


def add_lora_(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: float) -> Tensor:
    """out += scaling·B·A·dropout(x) in place (out: (..., out_features), contiguous); returns out.

    Differentiable in x, A and B (and out, whose gradient passes through); `dropout` > 0 only in training.
    """
    needs_grad = torch.is_grad_enabled() and (out.requires_grad or x.requires_grad or A.requires_grad
                                              or B.requires_grad)
    if needs_grad:
        return LoraAdd.apply(out, x, A, B, scaling, dropout)
    _forward(out, x, A, B, scaling, dropout, compute_dtype(x, A))
    return out


def _forward(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: float,
             dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The in-place update; returns the scaled intermediate h = s·A·xd (N x r) and the dropout mask."""
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    mask = None
    if dropout:
        keep = torch.empty_like(x2).bernoulli_(1 - dropout)  # the same random stream as F.dropout
        mask = keep.bool()
        x2 = x2 * keep.div_(1 - dropout)
    h = torch.mm(x2, A.to(dtype).T).mul_(scaling)
    out2 = out.view(-1, out.shape[-1])
    if out.dtype == dtype:
        add_rank_term_(out2, h, B.to(dtype))
    else:
        out2.add_(torch.mm(h, B.to(dtype).T))
    return h, mask


class LoraAdd(torch.autograd.Function):
    """Autograd for `add_lora_`; the dropped input is rebuilt from x and the mask in backward."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: float) -> Tensor:
        dtype = compute_dtype(x, A)
        h, mask = _forward(out, x, A, B, scaling, dropout, dtype)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, h, mask)
        ctx.scaling, ctx.dropout, ctx.dtype = scaling, dropout, dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, A, B, h, mask = ctx.saved_tensors
        dtype, need = ctx.dtype, ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_h = times_b(g, B.to(dtype)).mul_(ctx.scaling)
        grad_x = grad_A = grad_B = None
        if need[3]:
            grad_B = grad_b(g, h).to(B.dtype)
        if need[2]:
            dropped = x.reshape(-1, x.shape[-1]).to(dtype)
            if mask is not None:
                dropped = dropped * _keep_scale(mask, ctx.dropout, dtype)
            grad_A = grad_a(grad_h, dropped).to(A.dtype)
        if need[1]:
            grad_x = torch.mm(grad_h, A.to(dtype))
            if mask is not None:
                grad_x = grad_x.mul_(_keep_scale(mask, ctx.dropout, dtype))
            grad_x = grad_x.view(x.shape).to(x.dtype)
        return grad if need[0] else None, grad_x, grad_A, grad_B, None, None


def _keep_scale(mask: Tensor, dropout: float, dtype: torch.dtype) -> Tensor:
    """The forward's dropout multiplier (0 or 1/(1-p)), rebuilt bit for bit from the mask."""
    return mask.to(dtype).div_(1 - dropout)


def add_dora_(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, magnitude: Tensor, norm: Tensor,
              bias: Tensor | None) -> Tensor:
    """DoRA without dropout, in place: out = g·(W·x + s·B·A·x) + b with g = m / ||W + s·B·A|| (norm detached).

    `out` is the base output W·x + b, contiguous, in the compute dtype. Saves one (N x out) tensor for
    the magnitude's gradient, where autograd's composition keeps two and makes five passes more.
    """
    return LoraDoraAdd.apply(out, x, A, B, scaling, magnitude, norm.detach(), bias)


class LoraDoraAdd(torch.autograd.Function):
    """Autograd for `add_dora_`: y = g·z + (1 - g)·b with z = base + s·B·A·x (bias included)."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, magnitude: Tensor,
                norm: Tensor, bias: Tensor | None) -> Tensor:
        dtype = out.dtype
        h, _ = _forward(out, x, A, B, scaling, 0.0, dtype)
        wide = torch.promote_types(dtype, torch.float32)  # the ratio in at least float32
        g = (magnitude.to(wide) / norm.to(wide)).to(dtype)
        z = out.clone() if ctx.needs_input_grad[5] else None  # the magnitude's gradient reads z
        out.mul_(g)
        if bias is not None:
            out.add_((1 - g) * bias.to(dtype))
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, h, g, norm, z, bias)
        ctx.scaling, ctx.magnitude_dtype = scaling, magnitude.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, A, B, h, g, norm, z, bias = ctx.saved_tensors
        need, dtype = ctx.needs_input_grad, h.dtype
        g2 = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_z = g2 * g  # the base output and the LoRA term are both scaled by g
        grad_h = times_b(grad_z, B.to(dtype))
        grad_x = grad_A = grad_B = grad_m = grad_bias = None
        if need[3]:
            grad_B = grad_b(grad_z, h).to(B.dtype)
        if need[2]:
            grad_A = grad_a(grad_h, x.reshape(-1, x.shape[-1]).to(dtype)).mul_(ctx.scaling).to(A.dtype)
        if need[1]:
            grad_x = torch.mm(grad_h, A.to(dtype)).mul_(ctx.scaling).view(x.shape).to(x.dtype)
        if need[5]:  # dy/dm = (z - b) / ||W + ΔW||
            weighted = (g2 * z.reshape(g2.shape)).sum(0)
            if bias is not None:
                weighted -= g2.sum(0) * bias.to(dtype)
            wide = torch.promote_types(dtype, torch.float32)
            grad_m = (weighted.to(wide) / norm.to(wide)).to(ctx.magnitude_dtype)
        if bias is not None and need[7]:
            grad_bias = ((1 - g) * g2.sum(0)).to(bias.dtype)
        grad_out = grad_z.view(grad.shape).to(grad.dtype) if need[0] else None
        return grad_out, grad_x, grad_A, grad_B, None, grad_m, None, grad_bias
