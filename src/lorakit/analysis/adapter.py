"""Model-level analysis: the paper's measures for every layer of an adapter, optionally against a second one.

Reads adapters only through lorakit.arithmetic.factors.layer_update (per-layer factors and scaling) and
the layer's `lora_dense_weight()` for W.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..arithmetic.build import check_source
from ..arithmetic.factors import factored_svd, layer_update, numerical_rank
from ..state import lora_layers
from .measures import Amplification, amplification, effective_rank, right_singular_vectors, similarity_grid


@dataclass
class LayerAnalysis:
    """One layer's update: spectrum, effective ranks, norm, amplification, and φ grids against `other`."""

    module: str
    rank: int
    norm: float
    singular_values: Tensor
    effective_rank_90: int
    effective_rank_99: int
    amplification: Amplification | None = None
    similarity_A: Tensor | None = None  # eq. 4 on the A matrices' right-singular vectors: (r, r_other)
    similarity_delta: Tensor | None = None  # eq. 4 on ΔW's right-singular vectors (its non-zero directions)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "module": self.module, "rank": self.rank, "norm": self.norm,
            "singular_values": self.singular_values.tolist(),
            "effective_rank_90": self.effective_rank_90, "effective_rank_99": self.effective_rank_99,
        }
        if self.amplification is not None:
            out["amplification"] = self.amplification.to_dict()
        if self.similarity_A is not None:
            out["similarity_A"] = self.similarity_A.tolist()
            out["similarity_delta"] = self.similarity_delta.tolist()
        return out


@dataclass
class AdapterAnalysis:
    adapter: str
    other: str | None
    layers: list[LayerAnalysis] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "other": self.other, "layers": [layer.to_dict() for layer in self.layers]}


def analyze(model: nn.Module, adapter: str, other: str | None = None, with_amplification: bool = True,
            seed: int = 0) -> AdapterAnalysis:
    """Every layer of `adapter`: singular spectrum of ΔW, effective rank at 90/99% energy, ||ΔW||_F, the
    amplification factor against W, and with `other` the (i, j) subspace-similarity grids on layers both adapt."""
    check_source(model, adapter)
    if other is not None:
        check_source(model, other)
    result = AdapterAnalysis(adapter, other)
    for module, layer in lora_layers(model):
        if adapter not in layer.lora_adapters:
            continue
        update = layer_update(layer, adapter, module)
        s = factored_svd(update)
        shape = (update.B.shape[0], update.A.shape[1])
        entry = LayerAnalysis(module, update.rank, float(s.S.pow(2).sum().sqrt()), s.S,
                              effective_rank(s.S, 0.9), effective_rank(s.S, 0.99))
        if with_amplification:
            entry.amplification = amplification(s, layer.lora_dense_weight(), seed=seed)
        if other is not None and other in layer.lora_adapters:
            second = layer_update(layer, other, module)
            entry.similarity_A = similarity_grid(right_singular_vectors(update.A), right_singular_vectors(second.A))
            s2 = factored_svd(second)
            k1, k2 = numerical_rank(s, shape), numerical_rank(s2, shape)
            entry.similarity_delta = similarity_grid(s.V[:, :k1], s2.V[:, :k2])
        result.layers.append(entry)
    return result
