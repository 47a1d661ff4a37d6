"""What adapters learned, with the LoRA paper's measures: spectra, effective rank, subspace similarity
(eq. 4), amplification (Table 7); pure functions on tensors plus `analyze` for a whole adapter."""

from .adapter import AdapterAnalysis, LayerAnalysis, analyze
from .measures import (
    Amplification,
    amplification,
    delta_subspace_similarity,
    effective_rank,
    right_singular_vectors,
    similarity_grid,
    singular_values,
    spectrum,
    subspace_similarity,
)

__all__ = [
    "analyze", "AdapterAnalysis", "LayerAnalysis", "Amplification", "amplification", "subspace_similarity",
    "delta_subspace_similarity", "similarity_grid", "right_singular_vectors", "singular_values", "spectrum",
    "effective_rank",
]
