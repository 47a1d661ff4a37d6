"""Which module classes can carry adapters, and the lorakit class each one is swapped to."""

from __future__ import annotations

import copy

from torch import nn

from ..module_tree import is_hf_conv1d
from ..quant.linear4bit import Linear4bit
from .conv import Conv1d, Conv2d, Conv3d
from .core import AdapterSpec, LoraLayer
from .embedding import Embedding
from .linear import Linear
from .linear4bit import LoraLinear4bit

_EXACT: dict[type[nn.Module], type[LoraLayer]] = {}
_SUBCLASSES: dict[type[nn.Module], type[LoraLayer]] = {}
ADAPTABLE_KINDS = "nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d (groups=1), lorakit Linear4bit"


def register_kind(lora_class: type[LoraLayer]) -> None:
    """Adapt modules of `lora_class.lora_base_class` (and its subclasses) with `lora_class`."""
    _EXACT[lora_class.lora_base_class] = lora_class


for _kind in (Linear, Embedding, Conv1d, Conv2d, Conv3d, LoraLinear4bit):
    register_kind(_kind)


def lora_class_for(cls: type[nn.Module]) -> type[LoraLayer] | None:
    """The lorakit class for a base class, or None when lorakit cannot adapt it."""
    if issubclass(cls, LoraLayer) or cls is nn.modules.linear.NonDynamicallyQuantizableLinear:
        return None  # already adapted / read directly by nn.MultiheadAttention, which never calls its forward
    if cls in _EXACT:
        return _EXACT[cls]
    if is_hf_conv1d(cls):
        from .hf_conv1d import Conv1D  # imports transformers, so only for models that have it

        return Conv1D
    for base, lora_cls in _EXACT.items():
        if issubclass(cls, base):
            return _subclass(lora_cls, cls)
    return None


def is_linear_like(cls: type[nn.Module]) -> bool:
    """Dense projections, the layers "all-linear" selects."""
    return issubclass(cls, (nn.Linear, Linear4bit)) or is_hf_conv1d(cls)


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
