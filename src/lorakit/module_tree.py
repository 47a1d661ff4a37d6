"""Helpers over a model's module tree that every floor uses: replacing a submodule by its dotted name,
matching names against target lists, and recognising transformers' Conv1D without importing transformers."""

from __future__ import annotations

import re

from torch import nn


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def name_matches(patterns: list[str] | tuple[str, ...] | str, name: str) -> bool:
    """A list matches a name exactly or as a dotted suffix; a string is a full-match regex."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def is_hf_conv1d(cls: type) -> bool:
    """transformers' Conv1D (GPT-2 family) or a subclass: a linear layer whose weight is stored (in, out).
    Recognised by name so that lorakit imports transformers only for models that use it."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in cls.__mro__)
