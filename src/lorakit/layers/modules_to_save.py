"""Whole modules trained per adapter (e.g. a new classification head), beside the frozen original."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModulesToSave(nn.Module):
    """Holds the original module and one trainable copy per adapter; the forward uses the active copy.

    Attribute names follow PEFT (`original_module`, `modules_to_save`) so its users find their way.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_copy: str | None = None
        self.disabled = False

    def add_copy(self, adapter: str) -> None:
        self.modules_to_save[adapter] = copy.deepcopy(self.original_module)

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active_copy = next((n for n in names if n in self.modules_to_save), None)

    def current(self) -> nn.Module:
        if self.disabled or self.active_copy is None:
            return self.original_module
        return self.modules_to_save[self.active_copy]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)
