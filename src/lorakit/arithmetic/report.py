"""The per-layer report that combine, resize and extract return: ranks and the share of ||ΔW||_F² kept."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerReport:
    """One layer: rank before and after, ||ΔW||_F of the update aimed at, and the share of its square kept.

    `kept_energy` is ||ΔW_kept||_F² / ||ΔW||_F² for the stored update ΔW_kept (an orthogonal truncation, so
    ||ΔW - ΔW_kept||_F² = (1 - kept_energy)·||ΔW||_F²).
    """

    module: str
    rank_before: int
    rank_after: int
    norm: float
    kept_energy: float


@dataclass
class RankReport:
    """What an arithmetic call produced: the adapter's name, its layers, and anything it could not capture."""

    adapter: str
    method: str
    layers: list[LayerReport] = field(default_factory=list)
    not_captured: list[str] = field(default_factory=list)  # extract: changed parameters a LoRA pair cannot hold

    @property
    def kept_energy(self) -> float:
        """Share of the summed ||ΔW||_F² over all layers that the result keeps."""
        total = sum(layer.norm**2 for layer in self.layers)
        return 1.0 if total == 0 else sum(layer.kept_energy * layer.norm**2 for layer in self.layers) / total

    @property
    def min_kept_energy(self) -> float:
        return min((layer.kept_energy for layer in self.layers), default=1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "method": self.method, "kept_energy": self.kept_energy,
                "min_kept_energy": self.min_kept_energy, "layers": [asdict(layer) for layer in self.layers],
                "not_captured": list(self.not_captured)}
