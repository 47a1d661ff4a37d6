"""lk.combine: a new adapter from weighted existing ones, computed on their true updates ΔW_i = s_i·B_i·A_i.

- cat: B = [w_1·s_1·B_1, ...], A = [A_1; ...]: exactly Σ w_i·ΔW_i at rank Σ r_i, no SVD.
- linear (task arithmetic): Σ w_i·ΔW_i through the exact SVD of the stacked factors; `rank=None` keeps every
  direction above float32 round-off (exact), `rank=k` keeps the top k (the best rank-k approximation).
- ties, dare_linear, dare_ties, magnitude_prune: element-wise on the dense updates (lorakit.arithmetic.dense),
  then the top `rank` directions of the result (default: Σ r_i of the inputs at that layer).
A layer that only some inputs adapt counts as ΔW = 0 in the others. Unlike PEFT's add_weighted_adapter, which
mixes the A and B stacks separately (so its result holds cross terms B_i·A_j), nothing here mixes factors.
DoRA sources (arithmetic/dora.py): one alone with cat / untruncated linear gives an exact DoRA adapter; with
dora_as_update=True each counts as its dense effective update W' - W and the result is a plain LoRA adapter
of `rank`; anything else is refused, since no DoRA adapter holds it.
Layers are independent: they run side by side on worker threads (arithmetic/workers.py), with a bound on the
dense memory in flight; DARE's drops are still drawn in model order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from ..errors import LorakitError
from ..layers.core import LoraLayer
from ..state import get_state, lora_layers
from . import dora
from .build import add_from_updates, check_source
from .dense import DENSE_METHODS, dare_keep_masks, merge_dense
from .factors import (WORK_DTYPE, GramSpectrum, Update, chosen_rank, direction_update, factored_svd, layer_update,
                      numerical_rank)
from .report import LayerReport, RankReport
from .workers import LayerJob, run_jobs, scratch

METHODS = ("cat", "linear", *DENSE_METHODS)


def combine(model: nn.Module, weights: dict[str, float], method: str = "linear", name: str = "combined",
            rank: int | None = None, density: float | None = None, seed: int = 0,
            dora_as_update: bool = False) -> RankReport:
    """Add adapter `name` = the `method` combination of {adapter: weight}; returns the per-layer report.

    `density` (share of entries kept) is needed by ties / dare_* / magnitude_prune; `seed` fixes DARE's
    random drops (one generator, layers in model order, inputs in the order of `weights`).
    `dora_as_update`: DoRA sources count as their effective update W' - W (dense), and the result is a
    plain LoRA adapter of `rank` (required for linear); without it DoRA sources are taken only where the
    result is exactly a DoRA adapter (one source, cat or untruncated linear).
    Layers run on torch.get_num_threads() worker threads with torch at one thread meanwhile (arithmetic/workers.py).
    """
    _check_arguments(model, weights, method, name, rank, density)
    dora_sources = [a for a in weights if dora.is_dora(model, a)]
    _check_dora(model, dora_sources, weights, method, rank, dora_as_update)
    if dora_sources and not dora_as_update:
        return _one_dora_source(model, dora_sources[0], float(weights[dora_sources[0]]), method, name)
    generator = torch.Generator().manual_seed(seed)
    report = RankReport(adapter=name, method=method + (" (DoRA sources as W' - W)" if dora_sources else ""))
    jobs = _layer_jobs(model, weights, method, rank, density, set(dora_sources), generator)
    layers = run_jobs(jobs)
    report.layers = [layer_report for layer_report, _ in layers]
    add_from_updates(model, name, {layer_report.module: update for layer_report, update in layers})
    return report


def _layer_jobs(model: nn.Module, weights: dict[str, float], method: str, rank: int | None, density: float | None,
                dora_sources: set[str], generator: torch.Generator) -> Iterator[LayerJob]:
    """One job per adapted layer, in model order; DARE's drops are drawn here, so in that order."""
    for module, layer in lora_layers(model):
        present = [(a, float(w)) for a, w in weights.items() if a in layer.lora_adapters]
        if not present:
            continue
        rank_before = sum(layer.lora_A[a].shape[0] for a, _ in present)  # fused parts: r each
        if method == "cat" or (method == "linear" and not dora_sources):
            parts = [(w, layer_update(layer, a, module)) for a, w in present]
            stacked = Update(torch.cat([w * u.B for w, u in parts], 1), torch.cat([u.A for _, u in parts], 0))
            yield LayerJob(partial(_factored_layer, module, stacked, rank_before, method, rank), 0)
            continue
        directions = [direction_update(layer, a) if a in dora_sources else layer_update(layer, a, module)
                      for a, _ in present]
        shape = (directions[0].B.shape[0], directions[0].A.shape[1])
        keep_masks = (dare_keep_masks(shape, len(present), density, generator) if method.startswith("dare") else None)
        sources = [(w, partial(_write_effective_update, layer, a) if a in dora_sources
                    else partial(_write_product, direction)) for (a, w), direction in zip(present, directions)]
        nbytes = 8 * shape[0] * shape[1] * (len(present) + 3) + (0 if keep_masks is None else keep_masks.numel())
        yield LayerJob(partial(_dense_layer, module, sources, shape, directions[0].B.device, rank_before, method, rank,
                               density, keep_masks), nbytes)


def _factored_layer(module: str, stacked: Update, rank_before: int, method: str,
                    rank: int | None) -> tuple[LayerReport, Update]:
    """cat (the stacked factors themselves) or linear (their exact SVD, cut to `rank` or to numerical rank)."""
    if method == "cat":
        return LayerReport(module, rank_before, rank_before, math.sqrt(stacked.squared_norm()), 1.0), stacked
    spectrum = factored_svd(stacked)
    shape = (stacked.B.shape[0], stacked.A.shape[1])
    keep = numerical_rank(spectrum, shape) if rank is None else chosen_rank(spectrum, rank, None)
    norm = float(spectrum.S.pow(2).sum().sqrt())
    return LayerReport(module, rank_before, keep, norm, spectrum.kept_fraction(keep)), spectrum.truncated(keep)


def _dense_layer(module: str, sources: list[tuple[float, Callable[[torch.Tensor], torch.Tensor]]],
                 shape: tuple[int, int], device: torch.device, rank_before: int, method: str, rank: int | None,
                 density: float | None, keep_masks: torch.Tensor | None) -> tuple[LayerReport, Update]:
    """The dense methods (and linear over DoRA effective updates): Σ or merge of w_i·ΔW_i, then its top
    `rank` directions (default: the inputs' total rank)."""
    tasks = scratch("tasks", (len(sources), *shape), WORK_DTYPE, device)
    for task, (weight, write) in zip(tasks, sources):
        write(task).mul_(weight)
    merged = tasks.sum(0) if method == "linear" else merge_dense(tasks, method, density, keep_masks)
    spectrum = GramSpectrum.of(merged)
    keep = chosen_rank(spectrum, rank or rank_before, None)
    norm = float(spectrum.S.pow(2).sum().sqrt())
    return LayerReport(module, rank_before, keep, norm, spectrum.kept_fraction(keep)), spectrum.truncated(keep)


def _write_product(update: Update, out: torch.Tensor) -> torch.Tensor:
    return torch.matmul(update.B, update.A, out=out)


def _write_effective_update(layer: LoraLayer, adapter: str, out: torch.Tensor) -> torch.Tensor:
    return out.copy_(dora.effective_update(layer, adapter))


def _one_dora_source(model: nn.Module, source: str, weight: float, method: str, name: str) -> RankReport:
    """`weight`·(W' - W) of one DoRA adapter, exactly, as a DoRA adapter (see arithmetic/dora.py)."""
    updates: dict[str, Update] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    report = RankReport(adapter=name, method=f"{method} (one DoRA source, exact DoRA result)")
    for module, layer in lora_layers(model):
        if source not in layer.lora_adapters:
            continue
        updates[module], magnitudes[module], norm = dora.weighted_source(layer, source, weight, module)
        report.layers.append(LayerReport(module, updates[module].rank, updates[module].rank, norm, 1.0))
    add_from_updates(model, name, updates, magnitudes)
    return report


def _check_dora(model: nn.Module, sources: list[str], weights: dict[str, float], method: str, rank: int | None,
                dora_as_update: bool) -> None:
    """Where DoRA sources give an exact result, a DoRA one, or (asked for) a LoRA one of W' - W; else why not."""
    if not isinstance(dora_as_update, bool):
        raise LorakitError(f"dora_as_update must be True or False, got {dora_as_update!r}")
    if dora_as_update and not sources:
        raise LorakitError(f"dora_as_update applies to DoRA sources, and none of {list(weights)} is DoRA; leave it out")
    for source in sources:
        dora.check_base_unmerged(model, source)
    if dora_as_update:
        if method == "cat":
            raise LorakitError("cat concatenates low-rank factors, and a DoRA source's effective update W' - W is "
                               "dense; use method='linear' with rank=k (the report gives the energy kept)")
        if method == "linear" and rank is None:
            raise LorakitError("a DoRA source's effective update W' - W is full rank, so an exact linear result would "
                               "be a full-rank adapter; give rank=k (the report gives the share of ||ΔW||_F² kept)")
        return
    if not sources:
        return
    why = (f"adapter(s) {sources} are DoRA: each turns W into m·(W + s·B·A)/||W + s·B·A|| with its own magnitudes, "
           "so their update W' - W is not s·B·A")
    if len(weights) > 1:
        raise LorakitError(
            f"{why}, and a weighted combination of DoRA adapters with each other or with LoRA ones is no DoRA adapter "
            "(no single magnitude and direction give it). Pass dora_as_update=True (CLI --dora-as-update) to combine "
            "their effective updates into a plain LoRA adapter of rank=k with a report of the energy kept, or "
            "combine one DoRA adapter alone"
        )
    if method not in ("cat", "linear"):
        raise LorakitError(f"{why}; {method} trims or drops entries of W' - W, which a DoRA adapter cannot hold. Pass "
                           "dora_as_update=True (CLI --dora-as-update) for a plain LoRA adapter of the result")
    if rank is not None:
        raise LorakitError(f"{why}; combine it exactly (rank=None, a DoRA adapter) and then lk.resize(model, name, "
                           "rank=k), which truncates its direction and keeps its magnitude")


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
