"""Merging methods defined element by element on dense updates: TIES, DARE and magnitude pruning.

Each input is a task vector τ_i = w_i·ΔW_i (the weight folded in, so a negative weight negates the task).
- magnitude_prune: keep the int(density·n) largest |τ_i| entries of each, sum.
- ties (Yadav et al., 2023): trim as above, elect each entry's sign as the sign of Σ_i τ̂_i (ties to +),
  and average the trimmed entries that agree with it (the disjoint mean).
- dare_linear (Yu et al., 2024): drop each entry with probability 1 - density, rescale the rest by
  1/density, sum. dare_ties: the same drop and rescale, then TIES's sign election and disjoint mean.
Random drops come from `generator` (a CPU one), one `torch.rand(shape) < density` draw per input in order.
"""

from __future__ import annotations

import torch
from torch import Tensor

DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def trim(task: Tensor, density: float) -> Tensor:
    """Keep the int(density·numel) entries of largest magnitude, zero the rest; among entries tied with the
    smallest kept magnitude, the first ones in row-major order are kept.

    The threshold comes from one selection (kthvalue, linear time) instead of a sort of the entries."""
    n = task.numel()
    keep = int(density * n)
    if keep >= n:
        return task
    if keep == 0:
        return torch.zeros_like(task)
    magnitude = task.abs().flatten()
    threshold = magnitude.kthvalue(n - keep + 1).values  # the keep-th largest magnitude
    mask = magnitude > threshold
    missing = keep - int(mask.sum())
    if missing:
        mask[(magnitude == threshold).nonzero().flatten()[:missing]] = True
    return task * mask.view(task.shape)


def drop_and_rescale(task: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability `density` and divide the kept ones by it."""
    if density >= 1:
        return task
    kept = (torch.rand(task.shape, generator=generator, dtype=torch.float64) < density).to(task.device)
    return task * kept / density


def disjoint_mean(tasks: Tensor) -> Tensor:
    """TIES's merge of stacked task vectors: per entry, the mean of those whose sign is the elected one."""
    elected = torch.where(tasks.sum(0) >= 0, 1.0, -1.0).to(tasks.dtype)
    agree = tasks.sign() == elected
    count = agree.sum(0).clamp_min(1)
    return (tasks * agree).sum(0) / count


def merge_dense(tasks: list[Tensor], method: str, density: float, generator: torch.Generator) -> Tensor:
    """Merge already weighted task vectors τ_i = w_i·ΔW_i (all the same shape) by `method`."""
    if method in ("ties", "magnitude_prune"):
        pruned = [trim(t, density) for t in tasks]
    else:
        pruned = [drop_and_rescale(t, density, generator) for t in tasks]
    stacked = torch.stack(pruned)
    if method in ("ties", "dare_ties"):
        return disjoint_mean(stacked)
    return stacked.sum(0)
