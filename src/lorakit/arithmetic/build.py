"""Turning per-layer updates into an adapter on the model, through the project's normal adapter machinery.

A result has its own rank per layer, so it gets a LoraConfig whose rank_pattern / alpha_pattern name each
layer whose rank differs from the most common one, with alpha = rank everywhere (scaling 1: the factors
carry the whole update). `lk.save` then writes PEFT's layout with those patterns. A DoRA result (see
arithmetic/dora.py) also gets its magnitude vector per layer.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import nn

from .. import pissa
from ..adapters import set_active, set_trainable
from ..config import LoraConfig
from ..errors import LorakitError
from ..inject import add_adapter, inject
from ..layers.core import AdapterSpec
from ..state import find_state, get_state, lora_layers
from .dora import magnitude, set_magnitude
from .factors import Update


def check_source(model: nn.Module, name: str) -> None:
    """An adapter arithmetic can read: known, not merged into the weights, not PiSSA (its base is a residual)."""
    state = get_state(model)
    if name not in state.configs:
        raise LorakitError(f"no adapter named {name!r}; this model has {sorted(state.configs)}")
    if any(name in layer.lora_merged for _, layer in lora_layers(model)):
        raise LorakitError(f"adapter {name!r} is merged into the weights; call lk.unmerge(model) first")
    if pissa.is_pissa(state.configs[name].init):
        raise LorakitError(
            f"adapter {name!r} is a PiSSA adapter, whose base weights hold a residual; save it (lk.save converts it "
            "to a plain LoRA pair) and load that onto a fresh copy of the base before combining or resizing it"
        )


def result_config(updates: dict[str, Update], template: LoraConfig | None = None, use_dora: bool = False) -> LoraConfig:
    """The config of an adapter holding exactly `updates` (module -> factors, scaling 1)."""
    ranks = {module: update.rank for module, update in updates.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(module): k for module, k in ranks.items() if k != r}
    settings = dict(r=r, alpha=r, target_modules=sorted(updates), exclude_modules=None, init="kaiming",
                    use_rslora=False, use_dora=use_dora, rank_pattern=rank_pattern, alpha_pattern=dict(rank_pattern))
    return template.replace(**settings) if template is not None else LoraConfig(**settings)


def add_from_updates(model: nn.Module, name: str, updates: dict[str, Update],
                     magnitudes: dict[str, torch.Tensor] | None = None) -> None:
    """A new adapter `name` holding `updates` (a DoRA adapter when `magnitudes` are given, one per module):
    injected on a plain model, else added (inactive, frozen)."""
    if not updates:
        raise LorakitError("the result has no layers to adapt (no input adapter covers any module)")
    cfg = result_config(updates, use_dora=magnitudes is not None)
    if find_state(model) is None:
        inject(model, cfg, name)
    else:
        add_adapter(model, name, cfg)
    _write(model, name, updates, magnitudes or {})


def replace_with_updates(model: nn.Module, name: str, updates: dict[str, Update]) -> None:
    """Adapter `name` re-created layer by layer at the updates' ranks; active/trainable sets are kept, and a
    DoRA adapter keeps its magnitude vectors."""
    state = get_state(model)
    magnitudes = {}
    for module, update in updates.items():
        layer = model.get_submodule(module)
        old = layer.lora_adapters[name]
        if old.use_dora:
            magnitudes[module] = magnitude(layer, name)
        layer.lora_delete(name)
        layer.lora_add(name, AdapterSpec(r=update.rank, alpha=update.rank, dropout=old.dropout, use_dora=old.use_dora))
    state.configs[name] = result_config(updates, state.configs[name], use_dora=state.configs[name].use_dora)
    set_active(model, state.active)
    set_trainable(model, state.trainable)
    _write(model, name, updates, magnitudes)


def _write(model: nn.Module, name: str, updates: dict[str, Update], magnitudes: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for module, update in updates.items():
            layer = model.get_submodule(module)
            A, B = layer.lora_A[name], layer.lora_B[name]
            A.copy_(update.A.reshape(A.shape))
            B.copy_(update.B.reshape(B.shape))
            if module in magnitudes:
                set_magnitude(layer, name, magnitudes[module])
