"""The rank-r products of a LoRA layer's forward and backward, each asked of the BLAS in its faster layout.

A product with a rank-r side can be asked of BLAS as C = L·R or as Cᵀ = Rᵀ·Lᵀ: the same sums, with the
small dimension on the other side of the call. MKL, the BLAS of PyTorch's x86 wheels, runs some of these
several times slower in one layout than the other. Measured on this project's CPU host (AMD EPYC, AVX2, MKL
2024.2, 2 threads; minima of 40 round-robin calls at GPT-2's 512 x 768 -> 768 / 2304 / 3072 and back):
- g·B and gᵀ·h at ranks 4-11 (gᵀ·h from 2): the transposed call takes 0.2-0.7x the time (gᵀ·h at
  768 -> 3072, r=8: 4.7 -> 2.8 ms). From rank 12 on the plain call is the faster one (r=16 and 64: the
  transposed 1.2-2.0x).
- grad_hᵀ·x: the plain call is faster up to rank 8 (the transposed 2-5x), the transposed one from 16
  (0.7-1.0x).
- The rank-r term added into the output in place (out += h·Bᵀ): the transposed call takes 0.72-1.01x the
  time at rank 8 and is level elsewhere, within the noise. The input gradient's in-place grad_h·A is not
  moved: there the transposed call took 0.93-1.23x.
x·Aᵀ is fastest as it is. `bench/bench_rank_products.py` prints both layouts of each product, and which
one is picked, on the host it runs on. The rule applies to CPU tensors only; other devices' BLAS get the
plain call.
"""

from __future__ import annotations

from torch import Tensor

# Below this rank the narrow layouts above win; ranks 12-15 were level within the host's noise.
NARROW_RANK = 12


def _narrow(rank: int, t: Tensor) -> bool:
    return rank < NARROW_RANK and t.device.type == "cpu"


def times_b(g: Tensor, B: Tensor) -> Tensor:
    """g·B: (N x out)·(out x r), the output gradient taken down to the rank-r intermediate."""
    return (B.T @ g.T).T if _narrow(B.shape[1], g) else g @ B


def grad_b(g: Tensor, h: Tensor) -> Tensor:
    """gᵀ·h: (out x N)·(N x r), B's gradient from the output gradient and the intermediate."""
    return (h.T @ g).T if _narrow(h.shape[1], g) else g.T @ h


def grad_a(grad_h: Tensor, x: Tensor) -> Tensor:
    """grad_hᵀ·x: (r x N)·(N x in), A's gradient from the intermediate's gradient and the input."""
    return grad_h.T @ x if _narrow(grad_h.shape[1], x) else (x.T @ grad_h).T


def add_rank_term_(out: Tensor, h: Tensor, B: Tensor) -> Tensor:
    """out += h·Bᵀ in place ((N x out), one dtype): the rank-r term into the base output; outᵀ += B·hᵀ on CPU."""
    if out.device.type == "cpu":
        out.T.addmm_(B, h.T)
    else:
        out.addmm_(h, B.T)
    return out
