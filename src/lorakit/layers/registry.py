"""Which module classes can carry adapters, and the lorakit class each one is swapped to."""

from __future__ import annotations

import copy

from torch import nn

from .conv import Conv1d, Conv2d, Conv3d
from .core import AdapterSpec, LoraLayer
from .embedding import Embedding
from .linear import Linear

_EXACT: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: Linear,
    nn.Embedding: Embedding,
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
}
_SUBCLASSES: dict[type[nn.Module], type[LoraLayer]] = {}
ADAPTABLE_KINDS = "nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d (groups=1), lorakit Linear4bit"


def lora_class_for(cls: type[nn.Module]) -> type[LoraLayer] | None:
    """The lorakit class for a base class, or None when lorakit cannot adapt it."""
    if issubclass(cls, LoraLayer) or cls is nn.modules.linear.NonDynamicallyQuantizableLinear:
        return None  # already adapted / read directly by nn.MultiheadAttention, which never calls its forward
    if cls in _EXACT:
        return _EXACT[cls]
    if _is_hf_conv1d(cls):
        from .hf_conv1d import Conv1D

        return Conv1D
    if _is_linear4bit(cls):
        from .linear4bit import Linear4bit

        return Linear4bit
    for base, lora_cls in _EXACT.items():
        if issubclass(cls, base):
            return _subclass(lora_cls, cls)
    return None


def is_linear_like(cls: type[nn.Module]) -> bool:
    """Dense projections, the layers "all-linear" selects."""
    return issubclass(cls, nn.Linear) or _is_hf_conv1d(cls) or _is_linear4bit(cls)


def _is_hf_conv1d(cls: type) -> bool:
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in cls.__mro__)


def _is_linear4bit(cls: type) -> bool:
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("lorakit.quant") for c in cls.__mro__)


def _subclass(lora_cls: type[LoraLayer], cls: type[nn.Module]) -> type[LoraLayer]:
    """A lorakit class for a user's subclass of a supported layer, keeping that subclass's forward."""
    if cls not in _SUBCLASSES:
        name = f"Lora_{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
        # a forward of its own may save its output for backward, so the adapter must not update it in place
        inplace = lora_cls.lora_inplace_kind and cls.forward is lora_cls.lora_base_class.forward
        attributes = {"lora_base_class": cls, "lora_inplace_kind": inplace, "__module__": __name__, "__qualname__": name}
        new_cls = type(name, (lora_cls, cls), attributes)
        globals()[name] = new_cls  # importable by name, so models with it pickle and deepcopy
        _SUBCLASSES[cls] = new_cls
    return _SUBCLASSES[cls]


def planned_shapes(module: nn.Module, spec: AdapterSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B that adapting `module` with `spec` would create, without touching `module`."""
    if isinstance(module, LoraLayer):
        return module.lora_shapes(spec)
    probe = copy.copy(module)  # shares the tensors; only the probe's class changes
    probe.__class__ = lora_class_for(type(module))
    return probe.lora_shapes(spec)
