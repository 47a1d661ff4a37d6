"""lk.combine: a new adapter from weighted existing ones, computed on their true updates ΔW_i = s_i·B_i·A_i.

- cat: B = [w_1·s_1·B_1, ...], A = [A_1; ...]: exactly Σ w_i·ΔW_i at rank Σ r_i, no SVD.
- linear (task arithmetic): Σ w_i·ΔW_i through the exact SVD of the stacked factors; `rank=None` keeps every
  direction above float32 round-off (exact), `rank=k` keeps the top k (the best rank-k approximation).
- ties, dare_linear, dare_ties, magnitude_prune: element-wise on the dense updates (lorakit.arithmetic.dense),
  then the top `rank` directions of the result (default: Σ r_i of the inputs at that layer).
A layer that only some inputs adapt counts as ΔW = 0 in the others. Unlike PEFT's add_weighted_adapter, which
mixes the A and B stacks separately (so its result holds cross terms B_i·A_j), nothing here mixes factors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import LorakitError
from ..state import get_state, lora_layers
from .build import add_from_updates, check_source
from .dense import DENSE_METHODS, merge_dense
from .factors import Update, chosen_rank, dense_svd, factored_svd, layer_update, numerical_rank
from .report import LayerReport, RankReport

METHODS = ("cat", "linear", *DENSE_METHODS)


def combine(model: nn.Module, weights: dict[str, float], method: str = "linear", name: str = "combined",
            rank: int | None = None, density: float | None = None, seed: int = 0) -> RankReport:
    """Add adapter `name` = the `method` combination of {adapter: weight}; returns the per-layer report.

    `density` (share of entries kept) is needed by ties / dare_* / magnitude_prune; `seed` fixes DARE's
    random drops (one generator, layers in model order, inputs in the order of `weights`).
    """
    _check_arguments(model, weights, method, name, rank, density)
    generator = torch.Generator().manual_seed(seed)
    updates: dict[str, Update] = {}
    report = RankReport(adapter=name, method=method)
    for module, layer in lora_layers(model):
        present = [(a, float(w)) for a, w in weights.items() if a in layer.lora_adapters]
        if not present:
            continue
        parts = [(w, layer_update(layer, a, module)) for a, w in present]
        rank_before = sum(u.rank for _, u in parts)
        if method in ("cat", "linear"):
            stacked = Update(torch.cat([w * u.B for w, u in parts], 1), torch.cat([u.A for _, u in parts], 0))
            if method == "cat":
                norm = math.sqrt(stacked.squared_norm())
                report.layers.append(LayerReport(module, rank_before, rank_before, norm, 1.0))
                updates[module] = stacked
                continue
            spectrum = factored_svd(stacked)
            shape = (stacked.B.shape[0], stacked.A.shape[1])
            keep = numerical_rank(spectrum, shape) if rank is None else chosen_rank(spectrum, rank, None)
        else:
            tasks = [w * u.dense() for w, u in parts]
            spectrum = dense_svd(merge_dense(tasks, method, density, generator))
            keep = chosen_rank(spectrum, rank or rank_before, None)
        norm = float(spectrum.S.pow(2).sum().sqrt())
        report.layers.append(LayerReport(module, rank_before, keep, norm, spectrum.kept_fraction(keep)))
        updates[module] = spectrum.truncated(keep)
    add_from_updates(model, name, updates)
    return report


def _check_arguments(model: nn.Module, weights: dict[str, float], method: str, name: str, rank: int | None,
                     density: float | None) -> None:
    """Everything checked before any work, so a bad call leaves the model untouched."""
    state = get_state(model)
    if not isinstance(weights, dict) or not weights:
        raise LorakitError('weights must be a dict of adapter name -> weight, e.g. {"a": 1.0, "b": -0.5}')
    for adapter, weight in weights.items():
        check_source(model, adapter)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise LorakitError(f"weight of {adapter!r} must be a finite number, got {weight!r}")
        if state.configs[adapter].modules_to_save:
            raise LorakitError(
                f"adapter {adapter!r} has modules_to_save {state.configs[adapter].modules_to_save}: whole-module "
                "copies are not low-rank updates and are not combined; load it without them to combine its LoRA layers"
            )
    if name in state.configs:
        raise LorakitError(f"adapter {name!r} already exists; pick another name= for the result")
    if method not in METHODS:
        raise LorakitError(f"method must be one of {METHODS}, got {method!r}")
    if method == "cat" and rank is not None:
        raise LorakitError("cat is exact at rank Σ r_i and takes no rank=; use method='linear' with rank=k to truncate")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LorakitError(f"rank must be an integer >= 1 or None, got {rank!r}")
    if method in DENSE_METHODS:
        if density is None or isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise LorakitError(f"method {method!r} needs density= in (0, 1] (share of entries kept), got {density!r}")
    elif density is not None:
        raise LorakitError(f"density applies to {DENSE_METHODS}, not to {method!r}; leave it out")
