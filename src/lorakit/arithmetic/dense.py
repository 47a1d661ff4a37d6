"""Merging methods defined element by element on dense updates: TIES, DARE and magnitude pruning.

Each input is a task vector τ_i = w_i·ΔW_i (the weight folded in, so a negative weight negates the task).
- magnitude_prune: keep the int(density·n) largest |τ_i| entries of each, sum.
- ties (Yadav et al., 2023): trim as above, elect each entry's sign as the sign of Σ_i τ̂_i (ties to +),
  and average the trimmed entries that agree with it (the disjoint mean).
- dare_linear (Yu et al., 2024): drop each entry with probability 1 - density, rescale the rest by
  1/density, sum. dare_ties: the same drop and rescale, then TIES's sign election and disjoint mean.
Random drops come from `generator` (a CPU one), one `torch.rand(shape) < density` draw per input in order.

One layer's tasks come stacked as an (inputs, out, in) float64 tensor that these functions overwrite in
place, so a layer needs about inputs + 2 dense matrices at once; temporaries come from the worker's reused
`scratch` buffers (arithmetic/workers.py). The trim's threshold is one linear-time
selection per task: numpy's introselect on CPU (about 5x faster than torch's kthvalue, which also tracks
indices), torch's kthvalue elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .workers import scratch

DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def trim_(tasks: Tensor, density: float) -> Tensor:
    """In each task (first dimension, contiguous) keep its int(density·n) entries of largest magnitude and zero
    the rest, in place; among entries tied with the smallest kept magnitude, the first ones in row-major order
    are kept."""
    rows = tasks.view(len(tasks), -1)
    n = rows.shape[1]
    keep = int(density * n)
    if keep >= n:
        return tasks
    if keep == 0:
        return tasks.zero_()
    magnitude = torch.abs(rows, out=scratch("magnitude", rows.shape, rows.dtype, rows.device))
    threshold = _kth_smallest_(magnitude, n - keep)  # the keep-th largest magnitude of each task
    torch.abs(rows, out=magnitude)  # the selection reordered it
    mask = torch.ge(magnitude, threshold[:, None], out=scratch("mask", rows.shape, torch.bool, rows.device))
    surplus = mask.sum(1) - keep  # entries tied with the threshold beyond the ones to keep
    for row in surplus.nonzero().flatten().tolist():
        tied = (magnitude[row] == threshold[row]).nonzero().flatten()
        mask[row, tied[len(tied) - int(surplus[row]):]] = False
    return tasks.mul_(mask.view(tasks.shape))


def _kth_smallest_(values: Tensor, index: int) -> Tensor:
    """Per row of `values` (reordered in place on CPU), the value at sorted position `index` (0-based)."""
    if values.device.type != "cpu":
        return values.kthvalue(index + 1, dim=1).values
    array = values.numpy()
    array.partition(index, axis=1)
    return torch.from_numpy(array[:, index].copy())


def dare_keep_masks(shape: tuple[int, ...], count: int, density: float, generator: torch.Generator) -> Tensor | None:
    """DARE's keep masks (count, *shape) for `count` inputs, drawn from `generator` in input order (None, and no
    draws, at density 1, where DARE keeps everything)."""
    if density >= 1:
        return None
    return torch.stack([torch.rand(shape, generator=generator, dtype=torch.float64) < density for _ in range(count)])


def disjoint_mean_(tasks: Tensor) -> Tensor:
    """TIES's merge of stacked task vectors: per entry, the mean of those whose sign is the elected one
    (the sign of their sum, ties to +). Overwrites `tasks`."""
    entries, device = tasks.shape[1:], tasks.device
    total = torch.sum(tasks, 0, out=scratch("total", entries, tasks.dtype, device))
    elected = torch.ge(total, 0, out=scratch("elected", entries, torch.bool, device))
    positive = torch.gt(tasks, 0, out=scratch("positive", tasks.shape, torch.bool, device))
    negative = torch.lt(tasks, 0, out=scratch("negative", tasks.shape, torch.bool, device))
    agree = torch.where(elected, positive, negative, out=positive)
    count = torch.sum(agree, 0, out=scratch("count", entries, torch.int64, device)).clamp_min_(1)
    return tasks.mul_(agree).sum(0).div_(count)


def merge_dense(tasks: Tensor, method: str, density: float, keep_masks: Tensor | None = None) -> Tensor:
    """Merge stacked, already weighted task vectors τ_i = w_i·ΔW_i (overwritten) by `method`; the DARE methods
    take the keep masks of `dare_keep_masks` (None at density 1)."""
    if method in ("ties", "magnitude_prune"):
        trim_(tasks, density)
    elif density < 1:  # DARE
        tasks.mul_(keep_masks.to(tasks.device)).div_(density)
    if method in ("ties", "dare_ties"):
        return disjoint_mean_(tasks)
    return tasks.sum(0)
