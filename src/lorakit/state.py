"""Where a model keeps its lorakit bookkeeping, and how to find its adapted layers.

A model gets its bookkeeping from `lk.inject` / `lk.load`, or, when it was written from scratch with lk.nn
layers (loralib style), from the layers themselves on the first model-level call (`adopt`), so every
model-level function (merge, save, set_active, ...) takes such a model like any other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

from .config import LoraConfig
from .errors import LorakitError
from .layers.core import LoraLayer
from .layers.modules_to_save import ModulesToSave

STATE_ATTRIBUTE = "lorakit_state"


@dataclass
class LorakitState:
    """Model-wide adapter settings; each layer keeps a copy of what its forward needs."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    trainable: tuple[str, ...] = ()


def get_state(model: nn.Module) -> LorakitState:
    state = find_state(model)
    if state is None:
        raise LorakitError("this model has no lorakit adapters; call lk.inject(model, cfg) first")
    return state


def find_state(model: nn.Module) -> LorakitState | None:
    """The model's bookkeeping; a model built from lk.nn layers gets it from them (`adopt`); None: no adapters."""
    if not isinstance(model, nn.Module):
        raise LorakitError(f"expected a torch.nn.Module, got {type(model).__name__}")
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None and any(layer.lora_adapters for _, layer in lora_layers(model)):
        state = adopt(model)
    return state


def adopt(model: nn.Module) -> LorakitState:
    """Bookkeeping for a model whose LoRA layers were constructed directly (lk.nn.Linear(..., r=8), ...).

    Each adapter name found on the layers gets a LoraConfig describing them (its rank and alpha where
    the layers agree, target_modules = those layers); the active set is what the layers run, and an
    adapter is trainable when its parameters require gradients (as `mark_only_lora_as_trainable` leaves them).
    """
    layers = [(name, layer) for name, layer in lora_layers(model) if layer.lora_adapters]
    state = LorakitState()
    for adapter in dict.fromkeys(n for _, layer in layers for n in layer.lora_adapters):
        holders = [(name, layer.lora_adapters[adapter]) for name, layer in layers if adapter in layer.lora_adapters]
        first = holders[0][1]
        state.configs[adapter] = LoraConfig(
            r=first.r, alpha=first.alpha, dropout=first.dropout, use_rslora=first.use_rslora,
            use_dora=first.use_dora, target_modules=[name for name, _ in holders],
            rank_pattern={re.escape(name): s.r for name, s in holders if s.r != first.r},
            alpha_pattern={re.escape(name): s.alpha for name, s in holders if s.alpha != first.alpha},
        )
    state.active = tuple(dict.fromkeys(n for _, layer in layers for n in layer.lora_active))
    state.trainable = tuple(a for a in state.configs
                            if any(p.requires_grad for _, layer in layers if a in layer.lora_adapters
                                   for p in layer.lora_parameters(a)))
    setattr(model, STATE_ATTRIBUTE, state)
    return state


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def check_adapter_names(state: LorakitState, names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Normalise a name / list / None to a tuple, rejecting names the model does not have."""
    if names is None:
        return ()
    listed = (names,) if isinstance(names, str) else tuple(names)
    for name in listed:
        if not isinstance(name, str):
            raise LorakitError(f"adapter names are strings, got {name!r}")
        if name not in state.configs:
            raise LorakitError(f"no adapter named {name!r}; this model has {sorted(state.configs)}")
    return listed
