"""Managing the adapters of an injected model: activate, train, delete, disable, route, merge, unload."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .errors import LorakitError
from .layers.routing import RoutePlan
from .module_tree import replace_module
from .state import STATE_ATTRIBUTE, check_adapter_names, get_state, lora_layers, saved_modules

AdapterNames = str | Sequence[str] | None


def set_active(model: nn.Module, names: AdapterNames) -> nn.Module:
    """Which adapters the forward adds: one name, several (their deltas summed), or None (base only)."""
    state = get_state(model)
    active = check_adapter_names(state, names)
    if active != state.active and _merged(model):
        raise LorakitError(
            f"adapters {sorted(_merged(model))} are merged into the weights; call lk.unmerge(model) before "
            "changing the active set"
        )
    for _, layer in lora_layers(model):
        layer.lora_set_active(active)
    for _, wrapper in saved_modules(model):
        wrapper.set_active(active)
    state.active = active
    return model


def set_trainable(model: nn.Module, names: AdapterNames) -> nn.Module:
    """Which adapters get gradients; everything else is frozen. Independent of `set_active`."""
    state = get_state(model)
    trainable = check_adapter_names(state, names)
    for param in model.parameters():
        param.requires_grad = False
    for _, layer in lora_layers(model):
        for name in layer.lora_adapters:
            for param in layer.lora_parameters(name):
                param.requires_grad = name in trainable
    for _, wrapper in saved_modules(model):
        for name, copy in wrapper.modules_to_save.items():
            copy.requires_grad_(name in trainable)
    biases = {state.configs[n].bias for n in trainable}
    if "all" in biases:
        for param_name, param in model.named_parameters():
            if "bias" in param_name and not _is_saved_original(param_name):
                param.requires_grad = True
    elif "lora_only" in biases:
        for _, layer in lora_layers(model):
            if getattr(layer, "bias", None) is not None:
                layer.bias.requires_grad = True
    state.trainable = trainable
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    state = get_state(model)
    check_adapter_names(state, name)
    if name in state.active:
        raise LorakitError(
            f"adapter {name!r} is active; activate others first (lk.set_active(model, ...)), then delete it"
        )
    if len(state.configs) == 1:
        raise LorakitError(f"{name!r} is the last adapter; use lk.unload(model) to remove lorakit entirely")
    for _, layer in lora_layers(model):
        if name in layer.lora_adapters:
            layer.lora_delete(name)
    for module_name, wrapper in list(saved_modules(model)):
        if name in wrapper.modules_to_save:
            del wrapper.modules_to_save[name]
        if not len(wrapper.modules_to_save):
            replace_module(model, module_name, wrapper.original_module)
    del state.configs[name]
    state.trainable = tuple(n for n in state.trainable if n != name)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Base-model outputs inside the block (merged adapters are taken out and put back)."""
    get_state(model)
    remerge = bool(_merged(model))
    if remerge:
        unmerge(model)
    _set_disabled(model, True)
    try:
        yield model
    finally:
        _set_disabled(model, False)
        if remerge:
            merge(model)


@contextlib.contextmanager
def route(model: nn.Module, names_per_row: Sequence[str | None], strategy: str = "auto") -> Iterator[nn.Module]:
    """Per-row adapters in one batch: row i uses adapter names_per_row[i] (None = the base model).

    The routing holds for every forward inside the block (all steps of `generate`): keep one block around
    a whole generation, so gathered weights are reused. `strategy`: "gather" (batched matmuls over every
    row's padded A and B), "group" (one pass per adapter) or "auto" (group on the first call, then gather
    where most rows have their own adapter); see lorakit/layers/routing.py.
    """
    state = get_state(model)
    if isinstance(names_per_row, str) or not len(names_per_row):
        raise LorakitError("lk.route takes a list with one adapter name (or None) per row of the batch")
    check_adapter_names(state, [n for n in names_per_row if n is not None])
    if _merged(model):
        raise LorakitError("routing needs unmerged adapters; call lk.unmerge(model) first")
    plan = RoutePlan(names_per_row, strategy)
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.lora_routes = plan
    try:
        yield model
    finally:
        for layer in layers:
            layer.lora_routes = None


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights (no added latency); undo with `unmerge`."""
    state = get_state(model)
    if not state.active:
        raise LorakitError("no adapter is active; lk.set_active(model, name) first, then merge")
    already = _merged(model) & set(state.active)
    if already:
        raise LorakitError(f"adapters {sorted(already)} are already merged; lk.unmerge(model) first to merge again")
    check_mergeable(model)
    for _, layer in lora_layers(model):
        layer.lora_merge(state.active)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    get_state(model)
    if not _merged(model):
        raise LorakitError("nothing is merged; lk.merge(model) folds the active adapters in")
    for _, layer in lora_layers(model):
        layer.lora_unmerge()
    return model


def unload(model: nn.Module, merge: bool = True, dequantize: bool = False) -> nn.Module:
    """The plain model again: active adapters folded in (merge=True) or dropped, no lorakit modules left.

    `dequantize=True` turns 4-bit layers back into nn.Linear in their compute dtype, with the adapter
    added to the dequantized weight (through float32); without it, merging into 4-bit layers is refused.
    """
    state = get_state(model)
    quantized = {name for name, layer in lora_layers(model) if layer.lora_merge_blocker}
    if merge and state.active:
        check_mergeable(model, skip=quantized if dequantize else set())
    deltas = {}
    for name, layer in lora_layers(model):
        if name in quantized and dequantize:
            live = [n for n in state.active if n in layer.lora_adapters] if merge else []
            deltas[name] = layer.lora_merged_update(live, layer.lora_dense_weight())[0]
        elif merge and state.active:
            layer.lora_merge(state.active)
        else:
            layer.lora_unmerge()
    for name, layer in list(lora_layers(model)):
        layer.lora_teardown()
        if name in deltas:
            replace_module(model, name, _dense(layer, deltas[name]))
    for name, wrapper in list(saved_modules(model)):
        replace_module(model, name, wrapper.current() if merge else wrapper.original_module)
    delattr(model, STATE_ATTRIBUTE)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors count once. A frozen weight stored as quantized
    codes (a buffer, not a parameter) counts as the dense weight it stands for, so a QLoRA model reports
    the same total, and trainable share, as the same model in 16 bits."""
    params = list(model.parameters())
    quantized = sum(getattr(module, "quantized_numel", 0) for module in model.modules())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


def check_mergeable(model: nn.Module, skip: set[str] = frozenset()) -> None:
    """Refuse before touching any weight: kinds that cannot merge, and weights other modules share."""
    owners: dict[int, list[str]] = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(param_name)
    for name, layer in lora_layers(model):
        if name in skip:
            continue
        if layer.lora_merge_blocker:
            raise LorakitError(f"cannot merge into {name}: {layer.lora_merge_blocker}")
        shared = owners.get(id(getattr(layer, "weight", None)), [])
        if len(shared) > 1:
            raise LorakitError(
                f"cannot merge into {name}: its weight is tied to {[n for n in shared if not n.startswith(name + '.')]}, "
                "which merging would change too; keep the adapter unmerged, or untie the weights first"
            )


def _merged(model: nn.Module) -> set[str]:
    return {name for _, layer in lora_layers(model) for name in layer.lora_merged}


def _dense(layer: nn.Module, delta: torch.Tensor) -> nn.Linear:
    """A 4-bit layer as nn.Linear in its compute dtype, with `delta` added through float32."""
    linear = layer.to_linear(layer.compute_dtype)
    merged = (linear.weight.detach().float() + delta).to(linear.weight.dtype)
    if not torch.isfinite(merged).all():
        raise LorakitError("merging into a dequantized 4-bit weight gives non-finite values; keep it unmerged")
    with torch.no_grad():
        linear.weight.copy_(merged)
    return linear


def _set_disabled(model: nn.Module, on: bool) -> None:
    for _, layer in lora_layers(model):
        layer.lora_disabled = on
        layer.lora_refresh()
    for _, wrapper in saved_modules(model):
        wrapper.disabled = on


def _is_saved_original(param_name: str) -> bool:
    return ".original_module." in param_name or param_name.startswith("original_module.")
