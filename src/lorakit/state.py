"""Where a model keeps its lorakit bookkeeping, and how to find its adapted layers."""

from __future__ import annotations

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
    if not isinstance(model, nn.Module):
        raise LorakitError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return getattr(model, STATE_ATTRIBUTE, None)


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
