"""The LoRA paper's measures of what an adapter learned, as pure functions on tensors (Hu et al., 2021, §7).

- The singular spectrum of ΔW, its effective rank (fewest directions holding 90% / 99% of ||ΔW||_F²).
- Subspace similarity, the paper's eq. 4: φ(A1, A2, i, j) = ||U1_iᵀ U2_j||_F² / min(i, j), where U1_i are the
  top-i right-singular vectors of A1 (r1 x d) and U2_j the top-j of A2; 1 when one span holds the other,
  0 when they are orthogonal, max(i, j)/d in expectation for random subspaces of R^d.
- The amplification factor of Table 7: ||ΔW||_F / ||Uᵀ W V||_F with U, V the top-r left/right singular
  vectors of ΔW, beside ||Uᵀ W V||_F for W's own top-r directions and for random ones.
A `delta` is a dense (out, in) tensor or a factor pair (B, A) with delta = B @ A; pairs never get densified.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..arithmetic.factors import Spectrum, Update, dense_svd, factored_svd, numerical_rank

Delta = Tensor | tuple[Tensor, Tensor]


def spectrum(delta: Delta) -> Spectrum:
    """Exact thin SVD of ΔW in float64; from the factors when given as (B, A)."""
    if isinstance(delta, tuple):
        B, A = delta
        return factored_svd(Update(B.detach().double().flatten(1), A.detach().double().flatten(1)))
    return dense_svd(delta.detach().double())


def singular_values(delta: Delta) -> Tensor:
    return spectrum(delta).S


def effective_rank(singular: Tensor, energy: float = 0.9) -> int:
    """Fewest directions whose squared singular values hold `energy` of the total (0 for a zero update)."""
    squared = singular.double().pow(2)
    total = float(squared.sum())
    if total == 0:
        return 0
    return int((torch.cumsum(squared, 0) / total < energy - 1e-12).sum()) + 1


def right_singular_vectors(A: Tensor) -> Tensor:
    """Orthonormal columns (d, r): the right-singular vectors of A (r x d), strongest first."""
    Q, R = torch.linalg.qr(A.detach().double().flatten(1).T)  # A = Rᵀ·Qᵀ: only an r x r SVD is left
    return Q @ torch.linalg.svd(R.T, full_matrices=False).Vh.T


def similarity_grid(U1: Tensor, U2: Tensor) -> Tensor:
    """φ(i, j) = ||U1[:, :i]ᵀ U2[:, :j]||_F² / min(i, j) for all i, j at once: entry [i-1, j-1]."""
    overlap = (U1.double().T @ U2.double()).pow(2)
    cumulative = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, U1.shape[1] + 1, dtype=torch.float64, device=overlap.device)[:, None]
    j = torch.arange(1, U2.shape[1] + 1, dtype=torch.float64, device=overlap.device)[None, :]
    return cumulative / torch.minimum(i, j)


def subspace_similarity(A1: Tensor, A2: Tensor) -> Tensor:
    """The paper's eq. 4 between two LoRA A matrices (r1 x d and r2 x d, any ranks): an (r1, r2) grid."""
    if A1.flatten(1).shape[1] != A2.flatten(1).shape[1]:
        raise ValueError(f"A matrices act on different input sizes: {tuple(A1.shape)} and {tuple(A2.shape)}")
    return similarity_grid(right_singular_vectors(A1), right_singular_vectors(A2))


def delta_subspace_similarity(delta1: Delta, delta2: Delta, side: str = "right") -> Tensor:
    """Eq. 4 on two updates' top singular directions: "right" (input space, as for A) or "left" (output).

    Each update contributes its numerically non-zero directions, so the grid is (rank1, rank2)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    bases = []
    for delta in (delta1, delta2):
        s = spectrum(delta)
        k = numerical_rank(s, (s.U.shape[0], s.V.shape[0]))
        bases.append((s.V if side == "right" else s.U)[:, :k])
    return similarity_grid(*bases)


@dataclass(frozen=True)
class Amplification:
    """Table 7 of the paper for one layer: norms of W projected on r-dim directions, and the factor."""

    rank: int
    delta_norm: float  # ||ΔW||_F
    weight_norm: float  # ||W||_F
    on_delta: float  # ||Uᵀ W V||_F, U and V the top-r singular vectors of ΔW
    on_weight: float  # the same with W's own top-r singular vectors (= sqrt of its r largest σ²)
    on_random: float  # the same with random orthonormal r-dim U and V

    @property
    def factor(self) -> float:
        """||ΔW||_F / ||Uᵀ W V||_F: how strongly ΔW amplifies directions W barely uses."""
        return self.delta_norm / self.on_delta if self.on_delta else float("inf")

    def to_dict(self) -> dict[str, float]:
        return asdict(self) | {"factor": self.factor}


def amplification(delta: Delta | Spectrum, W: Tensor, rank: int | None = None, seed: int = 0) -> Amplification:
    """Table 7's quantities for update `delta` (or its Spectrum) of weight `W` (out, in); `rank` defaults to
    ΔW's own rank. Projections of W run in W's float32: they feed ratios, not reconstructions."""
    W = W.detach().float().flatten(1)
    s = delta if isinstance(delta, Spectrum) else spectrum(delta)
    if (s.U.shape[0], s.V.shape[0]) != tuple(W.shape):
        raise ValueError(f"ΔW is {(s.U.shape[0], s.V.shape[0])} but W is {tuple(W.shape)}")
    r = rank if rank is not None else numerical_rank(s, tuple(W.shape))
    U, V = s.U[:, :r].to(W), s.V[:, :r].to(W)
    generator = torch.Generator().manual_seed(seed)
    U_random = torch.linalg.qr(torch.randn(W.shape[0], r, generator=generator))[0].to(W.device)
    V_random = torch.linalg.qr(torch.randn(W.shape[1], r, generator=generator))[0].to(W.device)
    return Amplification(
        rank=r,
        delta_norm=float(s.S.pow(2).sum().sqrt()),
        weight_norm=float(W.double().norm()),
        on_delta=float((U.T @ W @ V).norm()),
        on_weight=_top_energy(W, r) ** 0.5,
        on_random=float((U_random.T @ W @ V_random).norm()),
    )


def _top_energy(W: Tensor, r: int) -> float:
    """Σ of the r largest σ² of W: eigenvalues of its Gram matrix on the smaller side (no SVD of W)."""
    gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
    eigenvalues = torch.linalg.eigvalsh(gram)  # ascending
    return float(eigenvalues[-r:].clamp_min(0).sum())
