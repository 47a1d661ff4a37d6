"""An adapter's true update ΔW = s·B·A per layer, kept in factored form, and its exact SVD from the factors.

Everything in lorakit's adapter arithmetic reads adapters through `layer_update` only, which touches the
narrowest part of a LoRA layer: `lora_adapters[name]` (r, scaling, groups, use_dora), `lora_A[name]` and
`lora_B[name]`. The SVD of a product B·A (out x k times k x in) never forms the (out, in) matrix: QR of B
and of Aᵀ leaves a k x k core whose SVD gives the singular values and vectors of B·A exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import LorakitError
from ..layers.core import LoraLayer

WORK_DTYPE = torch.float64  # factors are small: float64 keeps "exact" results at float32 round-off


@dataclass(frozen=True)
class Update:
    """ΔW = B @ A with the scaling folded into B: B is (out, k), A is (k, in·kernel), both float64."""

    B: Tensor
    A: Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense(self) -> Tensor:
        return self.B @ self.A

    def squared_norm(self) -> float:
        """||B·A||_F² from k x k products: trace((BᵀB)(AAᵀ))."""
        return float(((self.B.T @ self.B) * (self.A @ self.A.T)).sum().clamp_min(0))


@dataclass(frozen=True)
class Spectrum:
    """ΔW = U·diag(S)·Vᵀ with S descending; U (out, k), V (in, k) orthonormal columns."""

    U: Tensor
    S: Tensor
    V: Tensor

    def kept_fraction(self, k: int) -> float:
        """Share of ||ΔW||_F² that the top-k directions carry (1.0 for a zero update)."""
        energy = self.S.pow(2)
        total = float(energy.sum())
        return 1.0 if total == 0 else float(energy[:k].sum()) / total

    def truncated(self, k: int) -> Update:
        """The best rank-k approximation as a balanced pair: B = U·√S, A = √S·Vᵀ (scaling 1)."""
        root = self.S[:k].sqrt()
        return Update(self.U[:, :k] * root, root[:, None] * self.V[:, :k].T)


def layer_update(layer: LoraLayer, name: str, module: str = "") -> Update:
    """The exact update of adapter `name` on `layer` as factors (fused-part adapters as one block pair).

    DoRA's update (g - 1)·W + g·s·B·A rescales the whole weight row by row, so it is not a low-rank
    product; it is refused here rather than approximated by its s·B·A part.
    """
    spec = layer.lora_adapters[name]
    if spec.use_dora:
        raise LorakitError(
            f"adapter {name!r} on {module or type(layer).__name__} is DoRA: its update (g - 1)·W + g·s·B·A rescales "
            "the base weight, which no low-rank pair represents, so adapter arithmetic on it would be inexact. "
            "Merge it (lk.unload(model, merge=True)) and use lk.extract(base, merged, rank=... or energy=...), "
            "which reports exactly how much of the update it keeps"
        )
    A = layer.lora_A[name].detach().to(WORK_DTYPE).flatten(1)
    B = layer.lora_B[name].detach().to(WORK_DTYPE).flatten(1)
    if spec.groups is not None:  # loralib MergedLinear: each enabled output part has its own rank-r block
        per_part = B.shape[0] // spec.n_enabled
        full = B.new_zeros(per_part * len(spec.groups), A.shape[0])
        for j, part in enumerate(i for i, on in enumerate(spec.groups) if on):
            full[part * per_part:(part + 1) * per_part, j * spec.r:(j + 1) * spec.r] = B[j * per_part:(j + 1) * per_part]
        B = full
    return Update(B * spec.scaling, A)


def factored_svd(update: Update) -> Spectrum:
    """Exact thin SVD of B·A: QR of B and Aᵀ, then the SVD of the small core R_B·R_Aᵀ."""
    Qb, Rb = torch.linalg.qr(update.B)
    Qa, Ra = torch.linalg.qr(update.A.T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Spectrum(Qb @ Uc, S, Qa @ Vch.T)


def dense_svd(delta: Tensor) -> Spectrum:
    """Thin SVD of a dense (out, in) update, for the methods whose result is not a low-rank product."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Spectrum(U, S, Vh.T)


def numerical_rank(spectrum: Spectrum, shape: tuple[int, int]) -> int:
    """Directions above float32 round-off of the largest one (at least 1, so a zero update stays a LoRA pair)."""
    S = spectrum.S
    if not len(S) or float(S[0]) == 0:
        return 1
    tolerance = float(S[0]) * max(shape) * torch.finfo(torch.float32).eps
    return max(1, int((S > tolerance).sum()))


def chosen_rank(spectrum: Spectrum, rank: int | None, energy: float | None) -> int:
    """`rank` (capped by the directions there are), or the fewest directions keeping `energy` of ||ΔW||_F²."""
    available = max(1, len(spectrum.S))
    if rank is not None:
        return min(rank, available)
    assert energy is not None
    energy_sq = spectrum.S.pow(2)
    total = float(energy_sq.sum())
    if total == 0:
        return 1
    cumulative = torch.cumsum(energy_sq, 0) / total
    reach = int((cumulative < energy - 1e-12).sum()) + 1
    return min(reach, available)


def check_target(rank: int | None, energy: float | None, allow_none: bool = False) -> None:
    """Exactly one of rank (an integer >= 1) and energy (in (0, 1]) unless both may be absent."""
    if rank is not None and energy is not None:
        raise LorakitError("give rank= or energy=, not both")
    if rank is None and energy is None and not allow_none:
        raise LorakitError("give rank=k (directions per layer) or energy=e (share of ||ΔW||_F² to keep, e.g. 0.95)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LorakitError(f"rank must be an integer >= 1, got {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1):
        raise LorakitError(f"energy must be a number in (0, 1], got {energy!r}")
