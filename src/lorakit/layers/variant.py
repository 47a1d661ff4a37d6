"""The seam between the layer core and adapter variants (plain LoRA, DoRA, ...), and their registry.

The core (core.py) computes what every variant shares: the adapter pair A, B, dropout, and the scaled
term s·B·A·x. A `Variant` says what its adapters do beyond that, and the core asks it instead of branching:

- its extra per-adapter parameters (one ParameterDict per kind on every LoRA layer, so state-dict keys
  read `<layer>.lora_magnitude.<adapter>`) and their adapter-file key suffixes;
- its term in the forward, given the plain LoRA term, and its in-place fast path if it has one;
- its merged update, as (c - 1)·W + c·ΔW with a per-row factor c (1 for plain LoRA), and how to take that
  update out again on unmerge.

A variant object is stateless and shared by every layer; what it must remember per layer (a cache, the
factor it merged with) lives in the layer's `lora_cache` / `lora_merge_state` dicts under the adapter's name.
Adding a variant: a new file with a `Variant` subclass that calls `register(...)` at import, and that
file imported in layers/__init__.py (see docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ..errors import LorakitError

if TYPE_CHECKING:
    from .core import AdapterSpec, LoraLayer


class Variant:
    """One kind of adapter; the defaults are plain LoRA's behaviour, so a variant overrides what differs."""

    name: ClassVar[str]
    parameter_dicts: ClassVar[tuple[str, ...]] = ()  # ParameterDicts on the layer holding this variant's extras
    file_keys: ClassVar[dict[str, str]] = {}  # adapter-file key suffix -> the ParameterDict its tensor fills
    merges_against_base: ClassVar[bool] = False  # its merged update depends on the unmerged weight
    inplace_alone: ClassVar[bool] = False  # its in-place path rescales the whole output: no other live adapter

    def __deepcopy__(self, memo: dict) -> Variant:
        return self  # stateless and shared: a copied model's layers keep the registered object

    def __reduce__(self) -> tuple:
        return registered_variant, (self.name,)  # pickled by name, unpickled as the registered object

    def selects(self, spec: AdapterSpec) -> bool:
        """Whether adapters with these settings are of this variant (plain LoRA takes the rest)."""
        raise NotImplementedError

    def check(self, layer_class: type, spec: AdapterSpec) -> str | None:
        """Why a layer of `layer_class` cannot hold such an adapter, or None when it can."""
        return None

    def add(self, layer: LoraLayer, name: str, spec: AdapterSpec, dtype: torch.dtype) -> None:
        """Create this variant's extra parameters for a new adapter (A and B exist already, with B = 0)."""

    def delete(self, layer: LoraLayer, name: str) -> None:
        """Forget an adapter's extra parameters and caches."""
        for dict_name in self.parameter_dicts:
            params = getattr(layer, dict_name)
            if name in params:
                del params[name]
        layer.lora_cache.pop(name, None)

    def extra_parameters(self, layer: LoraLayer, name: str) -> dict[str, nn.Parameter]:
        """This adapter's parameters beyond A and B, by adapter-file key suffix."""
        return {suffix: getattr(layer, dict_name)[name] for suffix, dict_name in self.file_keys.items()}

    def can_inplace(self, spec: AdapterSpec) -> bool:
        """Whether `add_inplace_` applies to such an adapter on a kind that allows in-place updates."""
        return False

    def can_fuse(self, spec: AdapterSpec) -> bool:
        """Whether the base kind's fused step (base and plain term s·B·A·x in one function) computes such an adapter."""
        return False

    def add_inplace_(self, layer: LoraLayer, name: str, out: Tensor, x: Tensor, base: Tensor) -> Tensor:
        """out (the base output, contiguous, written in place) plus this adapter's term; returns out."""
        return out + layer.lora_term(x, name, base).to(out.dtype)

    def term(self, layer: LoraLayer, name: str, x: Tensor, lora: Tensor, base: Tensor | None,
             dropped: bool) -> Tensor:
        """What the adapter adds to the base output `base`, given its plain term lora = s·B·A·dropout(x).

        `x` is the input as the adapter saw it (after dropout when `dropped`)."""
        return lora

    def merged_update(self, layer: LoraLayer, name: str, weight: Tensor, delta: Tensor) -> tuple[Tensor, Tensor | None]:
        """(what merging adds to the float32 (out, in) `weight`, per-row factor c to keep for unmerging or None
        for c = 1), given the adapter's dense delta s·B·A."""
        return delta, None

    def unmerge_update(self, delta: Tensor, kept: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(what to subtract from the merged weight, c - 1 per row or None) for an adapter merged with factor
        `kept`: the merged weight is W·(1 + Σ(c - 1)) + Σ c·ΔW, solved for W by the core."""
        if kept is None:
            return delta, None
        return kept[:, None] * delta, kept - 1


_REGISTRY: dict[str, Variant] = {}
PLAIN = "lora"  # the variant every adapter is unless another one selects it


def register(variant: Variant) -> Variant:
    """Make a variant known to every LoRA layer; a second one under the same name is an error."""
    if variant.name in _REGISTRY:
        raise LorakitError(f"an adapter variant named {variant.name!r} is already registered")
    _REGISTRY[variant.name] = variant
    return variant


def registered() -> tuple[Variant, ...]:
    return tuple(_REGISTRY.values())


def registered_variant(name: str) -> Variant:
    if name not in _REGISTRY:
        raise LorakitError(f"no adapter variant named {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def variant_of(spec: AdapterSpec) -> Variant:
    """The variant an adapter with these settings is; two variants claiming it is an error naming both."""
    chosen = [v for name, v in _REGISTRY.items() if name != PLAIN and v.selects(spec)]
    if len(chosen) > 1:
        raise LorakitError(f"adapter settings select the variants {[v.name for v in chosen]} at once; choose one")
    return chosen[0] if chosen else _REGISTRY[PLAIN]


def parameter_dicts() -> tuple[str, ...]:
    """Every ParameterDict the registered variants keep on a LoRA layer."""
    return tuple(d for v in _REGISTRY.values() for d in v.parameter_dicts)
