"""An adapter's true update ΔW = s·B·A per layer, kept in factored form, and its exact SVD from the factors.

Everything in lorakit's adapter arithmetic reads adapters through `layer_update` only, which touches the
narrowest part of a LoRA layer: `lora_adapters[name]` (r, scaling, groups, use_dora), `lora_A[name]` and
`lora_B[name]`. The SVD of a product B·A (out x k times k x in) never forms the (out, in) matrix: QR of B
and of Aᵀ leaves a k x k core whose SVD gives the singular values and vectors of B·A exactly.

A dense update (TIES, DARE, a DoRA effective update, extraction) gets `GramSpectrum`: the eigenvalues of its
Gram matrix on the smaller side give every singular value, and a truncation to k directions projects onto
the top-k eigenvectors and finishes with a QR and a k x k SVD, about 2-3x less work than a full SVD of the
(out, in) matrix, for the same best rank-k approximation to round-off (see GramSpectrum).
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
        return kept_fraction(self.S, k)

    def truncated(self, k: int) -> Update:
        """The best rank-k approximation as a balanced pair: B = U·√S, A = √S·Vᵀ (scaling 1)."""
        return balanced(self.U[:, :k], self.S[:k], self.V[:, :k])


@dataclass(frozen=True)
class GramSpectrum:
    """Singular values of a dense M (out, in), and its best rank-k approximations, without an SVD of M.

    With X = M (or Mᵀ when out < in) of shape (p, q), q <= p: the float64 eigen decomposition of XᵀX (q x q)
    gives σ_i² for all i, with an absolute error of about (p + q)·eps64·σ_1² (far below float32 round-off of the
    result). `truncated(k)` projects X on the top-k eigenvectors V_k and takes the exact SVD of X·V_k by a
    QR and a k x k SVD (Rayleigh-Ritz), so the stored update is X·V_k·V_kᵀ: at k = q that is X itself, and
    below it the best rank-k approximation up to the eigenvectors' round-off.
    """

    M: Tensor
    S: Tensor  # every singular value, descending
    V: Tensor  # (q, q) eigenvectors of XᵀX in the same order
    transposed: bool

    @classmethod
    def of(cls, M: Tensor) -> GramSpectrum:
        transposed = M.shape[0] < M.shape[1]
        X = M.T if transposed else M
        eigenvalues, vectors = torch.linalg.eigh(X.T @ X)  # ascending
        return cls(M, eigenvalues.flip(0).clamp_min(0).sqrt(), vectors.flip(1), transposed)

    def kept_fraction(self, k: int) -> float:
        return kept_fraction(self.S, k)

    def truncated(self, k: int) -> Update:
        X = self.M.T if self.transposed else self.M
        V_k = self.V[:, :k]
        Q, R = torch.linalg.qr(X @ V_k)
        Ur, S, Vrh = torch.linalg.svd(R)
        left, right = Q @ Ur, V_k @ Vrh.T  # X·V_k·V_kᵀ = left·diag(S)·rightᵀ
        return balanced(right, S, left) if self.transposed else balanced(left, S, right)


def kept_fraction(S: Tensor, k: int) -> float:
    """Share of Σ S² in the first k entries (1.0 when all are zero)."""
    energy = S.pow(2)
    total = float(energy.sum())
    return 1.0 if total == 0 else float(energy[:k].sum()) / total


def balanced(U: Tensor, S: Tensor, V: Tensor) -> Update:
    """U·diag(S)·Vᵀ as the pair B = U·√S, A = √S·Vᵀ (scaling 1)."""
    root = S.sqrt()
    return Update(U * root, root[:, None] * V.T)


def layer_update(layer: LoraLayer, name: str, module: str = "") -> Update:
    """The exact update of adapter `name` on `layer` as factors (fused-part adapters as one block pair).

    DoRA's update (g - 1)·W + g·s·B·A rescales the whole weight row by row, so it is not a low-rank
    product; it is refused here rather than approximated by its s·B·A part (lorakit.arithmetic.dora
    handles DoRA where that is exact).
    """
    if layer.lora_adapters[name].use_dora:
        raise LorakitError(
            f"adapter {name!r} on {module or type(layer).__name__} is DoRA: its update (g - 1)·W + g·s·B·A rescales "
            "the base weight row by row, which no low-rank pair represents, so this measure of it would be "
            "inexact. lk.resize and lk.combine take DoRA adapters where the result is exact (see "
            "docs/analysis.md); otherwise merge it (lk.unload(model, merge=True)) and use lk.extract(base, merged, "
            "rank=... or energy=...), which reports how much of the update it keeps"
        )
    return direction_update(layer, name)


def direction_update(layer: LoraLayer, name: str) -> Update:
    """s·B·A of adapter `name` as factors, for a DoRA adapter too (there it is the direction's update)."""
    spec = layer.lora_adapters[name]
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
    """Thin SVD of a dense (out, in) update with every singular vector (the analysis' pure functions; arithmetic
    on dense updates uses GramSpectrum, which needs only the kept ones)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Spectrum(U, S, Vh.T)


def numerical_rank(spectrum: Spectrum | GramSpectrum, shape: tuple[int, int]) -> int:
    """Directions above float32 round-off of the largest one (at least 1, so a zero update stays a LoRA pair)."""
    S = spectrum.S
    if not len(S) or float(S[0]) == 0:
        return 1
    tolerance = float(S[0]) * max(shape) * torch.finfo(torch.float32).eps
    return max(1, int((S > tolerance).sum()))


def chosen_rank(spectrum: Spectrum | GramSpectrum, rank: int | None, energy: float | None) -> int:
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
