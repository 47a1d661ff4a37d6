"""lk.extract: a LoRA adapter from the weight differences of a fully fine-tuned (or merged) model.

ΔW = W_tuned - W_base is dense here, so each layer takes the spectrum of its (out, in) difference (GramSpectrum); the
adapter keeps the top `rank` directions or the fewest holding `energy` of ||ΔW||_F², layers side by side on
worker threads (arithmetic/workers.py). Changed parameters a LoRA pair cannot hold (biases, norms, layers
outside the targets) are listed in the report, never dropped silently.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import partial

import torch
from torch import Tensor, nn

from ..errors import LorakitError
from ..inject import adaptable_modules, base_modules, name_matches, resolve_targets
from ..layers.core import LoraLayer
from ..layers.registry import lora_class_for
from ..state import find_state, lora_layers
from .build import add_from_updates
from .factors import GramSpectrum, Update, check_target, chosen_rank
from .report import LayerReport, RankReport
from .workers import LayerJob, run_jobs


def extract(base_model: nn.Module, tuned_model: nn.Module, rank: int | None = None, energy: float | None = None,
            name: str = "default", target_modules: list[str] | str | None = "all-linear") -> RankReport:
    """Add adapter `name` to `base_model` holding tuned - base on `target_modules` (default: every linear
    layer but the output head); returns the per-layer report, whose `not_captured` lists other changes."""
    check_target(rank, energy)
    _check_models(base_model, tuned_model, name)
    targets = resolve_targets(base_model, target_modules)
    report = RankReport(adapter=name, method=f"extract rank={rank}" if rank is not None else f"extract energy={energy}")
    layers = [found for found in run_jobs(_layer_jobs(base_model, tuned_model, targets, rank, energy)) if found]
    report.layers = [layer_report for layer_report, _ in layers]
    updates = {layer_report.module: update for layer_report, update in layers}
    if not updates:
        raise LorakitError("the tuned model's target weights equal the base's: there is no difference to extract")
    report.not_captured = _other_changes(base_model, tuned_model, set(updates))
    add_from_updates(base_model, name, updates)
    return report


def _layer_jobs(base_model: nn.Module, tuned_model: nn.Module, targets: list[str] | str, rank: int | None,
                energy: float | None) -> Iterator[LayerJob]:
    """One job per target layer, in model order (layers run side by side, see arithmetic/workers.py)."""
    tuned_modules = dict(base_modules(tuned_model))
    for module_name, module in adaptable_modules(base_model):
        if not name_matches(targets, module_name):
            continue
        tuned = tuned_modules.get(module_name)
        if tuned is None:
            raise LorakitError(f"the tuned model has no module {module_name!r}; is it a fine-tune of this base?")
        before, after = _dense_weight(module), _dense_weight(tuned)
        if before.shape != after.shape:
            raise LorakitError(f"{module_name}: base weight is {tuple(before.shape)} but the tuned one is "
                               f"{tuple(after.shape)}; the models are not the same architecture")
        yield LayerJob(partial(_extract_layer, module_name, before, after, rank, energy), 8 * before.numel() * 3)


def _extract_layer(module_name: str, before: Tensor, after: Tensor, rank: int | None,
                   energy: float | None) -> tuple[LayerReport, Update] | None:
    """The kept directions of after - before (None where the weight did not change)."""
    delta = after.detach().float() - before.detach().float()
    if not delta.any():
        return None
    spectrum = GramSpectrum.of(delta.double())
    keep = chosen_rank(spectrum, rank, energy)
    norm = float(spectrum.S.pow(2).sum().sqrt())
    return LayerReport(module_name, len(spectrum.S), keep, norm, spectrum.kept_fraction(keep)), spectrum.truncated(keep)


def _check_models(base_model: nn.Module, tuned_model: nn.Module, name: str) -> None:
    tuned_state = find_state(tuned_model)
    if tuned_state is not None and any(layer.lora_live for _, layer in lora_layers(tuned_model)):
        raise LorakitError("the tuned model has unmerged lorakit adapters; merge them first "
                           "(lk.unload(tuned, merge=True)) so its weights hold the whole model")
    if any(layer.lora_merged for _, layer in lora_layers(base_model)):
        raise LorakitError("the base model has adapters merged into its weights; call lk.unmerge(base) first")
    state = find_state(base_model)
    if state is not None and name in state.configs:
        raise LorakitError(f"the base model already has an adapter named {name!r}; pass another name=")


def _dense_weight(module: nn.Module) -> Tensor:
    """A module's weight as an (out, in·kernel) matrix, read by its lorakit layer kind without changing it."""
    if isinstance(module, LoraLayer):
        return module.lora_dense_weight()
    probe = copy.copy(module)  # shares the tensors; only the probe's class changes
    probe.__class__ = lora_class_for(type(module))
    return probe.lora_dense_weight()


def _other_changes(base_model: nn.Module, tuned_model: nn.Module, extracted: set[str]) -> list[str]:
    """Parameters that differ between the models but are not the weight of an extracted layer."""
    base = {n: p for n, p in base_model.named_parameters() if ".lora_" not in n}
    changed = []
    for param_name, tuned in tuned_model.named_parameters():
        original = base.get(param_name)
        owner, _, leaf = param_name.rpartition(".")
        if original is None or ".lora_" in param_name or (owner in extracted and leaf == "weight"):
            continue
        if original.shape != tuned.shape or not torch.equal(original.detach(), tuned.detach()):
            changed.append(param_name)
    return changed
