"""What makes lk.nn layers a drop-in for loralib's: the attributes loralib code reads (`r`, `lora_alpha`,
`scaling`, `merged`, `merge_weights`, `lora_dropout`, `enable_lora`) and loralib's state_dict keys.

Layers that `lk.inject` swaps keep PEFT's keys (`lora_A.default`); only layers constructed directly
(`lk.nn.Linear(..., r=8)`) write loralib's (`lora_A`), so a model of them loads into loralib's with strict=True.
Reading accepts both (core's `_accept_loralib_keys`).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from .core import AdapterSpec

LORALIB_ADAPTER = "default"  # the one adapter a directly constructed layer holds


def _identity(x: Tensor) -> Tensor:
    return x


def _attribute(name: str, read: Callable[[Any, AdapterSpec | None], Any]) -> property:
    """A loralib attribute read from the layer's own adapter; a value the module or its original class defines
    (a user's nn.Linear subclass with its own `scaling`) stays its own."""

    def get(self: Any) -> Any:
        if name in self.__dict__:
            return self.__dict__[name]
        if hasattr(self.lora_base_class, name):
            return getattr(self.lora_base_class, name)
        return read(self, self.lora_adapters.get(LORALIB_ADAPTER))

    def set_(self: Any, value: Any) -> None:
        self.__dict__[name] = value

    return property(get, set_, doc=f"loralib's `{name}`")


class LoralibAttributes:
    """loralib's per-layer attributes, for code written against loralib's layers."""

    r = _attribute("r", lambda self, spec: spec.r if spec else 0)
    lora_alpha = _attribute("lora_alpha", lambda self, spec: spec.alpha if spec else 1)
    scaling = _attribute("scaling", lambda self, spec: spec.scaling if spec else None)
    merged = _attribute("merged", lambda self, spec: LORALIB_ADAPTER in self.lora_merged)
    merge_weights = _attribute("merge_weights", lambda self, spec: self.lora_merge_on_eval)
    lora_dropout = _attribute("lora_dropout", lambda self, spec: nn.Dropout(spec.dropout)
                              if spec and spec.dropout > 0 else _identity)
    enable_lora = _attribute("enable_lora", lambda self, spec: list(spec.groups) if spec and spec.groups
                             else [spec is not None])

    def lora_teardown(self) -> None:
        """Also drop loralib's key names, so the restored module writes its usual state_dict."""
        self.__dict__.pop("lora_loralib_keys", None)
        for key, hook in list(self._state_dict_hooks.items()):
            if hook is _to_loralib_keys:
                del self._state_dict_hooks[key]
        super().lora_teardown()


def use_loralib_keys(module: nn.Module, renames: dict[str, str] | None = None) -> None:
    """Make `module.state_dict()` use loralib's keys: `lora_A` / `lora_B`, plus `renames` (own -> loralib)."""
    module.lora_loralib_keys = {f"lora_A.{LORALIB_ADAPTER}": "lora_A", f"lora_B.{LORALIB_ADAPTER}": "lora_B",
                                **(renames or {})}
    module._register_state_dict_hook(_to_loralib_keys)
    module._register_load_state_dict_pre_hook(_from_loralib_keys, with_module=True)


def _to_loralib_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for own, theirs in getattr(module, "lora_loralib_keys", {}).items():  # gone once lk.unload restored the class
        if prefix + own in state_dict:
            state_dict[prefix + theirs] = state_dict.pop(prefix + own)


def _from_loralib_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for own, theirs in getattr(module, "lora_loralib_keys", {}).items():
        if prefix + theirs in state_dict and not own.startswith("lora_"):  # core reads loralib's lora_A / lora_B
            state_dict[prefix + own] = state_dict.pop(prefix + theirs)
