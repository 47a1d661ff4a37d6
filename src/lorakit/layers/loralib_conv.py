"""loralib's convolution layers (`lk.nn.Conv1d/2d/3d`): its parametrization, outputs and state_dict keys.

loralib wraps the convolution (`conv.weight`, `conv.bias`) and learns A of shape (r·k, in·k) and B of shape
(out·k, r·k) for kernel size k; the update is B·A reshaped to the weight's shape, so the layer computes
conv(x, W + s·ΔW). For Conv1d and Conv3d with k > 1 that reshape cannot work in loralib itself (B·A has
out·in·k² entries, the weight out·in·k or out·in·k³), so loralib cannot run them; lorakit then uses the same
scheme with B of shape (out·k^(d-1), r·k), which equals loralib's wherever loralib runs (2-d, or k = 1).
`lk.inject` on nn.Conv* keeps PEFT's layout instead (layers/conv.py).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import LorakitError
from .core import AdapterSpec, LoraLayer
from .loralib_style import LORALIB_ADAPTER, LoralibAttributes, use_loralib_keys


class LoralibConvKind(LoralibAttributes, LoraLayer):
    """Hooks for loralib's conv parametrization: the dense layout is the (out·k^(d-1), in·k) matrix B·A."""

    weight: Tensor

    @property
    def lora_out_features(self) -> int:
        return self.out_channels

    def lora_shapes(self, spec: AdapterSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if spec.groups is not None:
            raise LorakitError("enable_lora (fused parts) applies to linear layers only, not convolutions")
        k, dims = self.kernel_size[0], len(self.kernel_size)
        return (spec.r * k, self.in_channels * k), (self.out_channels * k ** (dims - 1), spec.r * k)

    def lora_term(self, x: Tensor, name: str, base: Tensor | None = None) -> Tensor:
        """conv(x, s·ΔW) without bias; loralib applies no dropout on convolutions."""
        spec = self.lora_adapters[name]
        A, B = self.lora_A[name], self.lora_B[name]
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        return self._conv_forward(x, self.lora_weight_layout(B @ A) * spec.scaling, None)

    def lora_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.reshape(self.weight.shape)

    def lora_dense_weight(self) -> Tensor:
        k, dims = self.kernel_size[0], len(self.kernel_size)
        return self.weight.reshape(self.out_channels * k ** (dims - 1), self.in_channels * k)

    @property
    def conv(self) -> nn.Module:
        """loralib's wrapped convolution: here the layer itself (`layer.conv.weight` is `layer.weight`)."""
        return self


def _init(self: LoralibConvKind, base: type[nn.Module], args: tuple, kwargs: dict, r: int, lora_alpha: float,
          lora_dropout: float, merge_weights: bool) -> None:
    base.__init__(self, *args, **kwargs)
    if len(set(self.kernel_size)) != 1 or self.groups != 1:
        raise LorakitError(f"lk.nn.{type(self).__name__} takes loralib's square kernels and groups=1, got "
                           f"kernel_size={self.kernel_size}, groups={self.groups}; use lk.inject on a "
                           f"plain nn.{base.__name__} for other shapes")
    self.lora_setup(merge_on_eval=merge_weights)
    use_loralib_keys(self, {"weight": "conv.weight", "bias": "conv.bias"})
    if r > 0:
        self.lora_add(LORALIB_ADAPTER, AdapterSpec(r=r, alpha=lora_alpha, dropout=lora_dropout))
        self.lora_set_active([LORALIB_ADAPTER])
        self.weight.requires_grad = False


class Conv1d(LoralibConvKind, nn.Conv1d):
    """loralib's `lora.Conv1d(in_channels, out_channels, kernel_size, r=..., lora_alpha=...)`."""

    lora_base_class = nn.Conv1d

    def __init__(self, *args: Any, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
                 merge_weights: bool = True, **kwargs: Any) -> None:
        _init(self, nn.Conv1d, args, kwargs, r, lora_alpha, lora_dropout, merge_weights)


class Conv2d(LoralibConvKind, nn.Conv2d):
    """loralib's `lora.Conv2d(in_channels, out_channels, kernel_size, r=..., lora_alpha=...)`."""

    lora_base_class = nn.Conv2d

    def __init__(self, *args: Any, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
                 merge_weights: bool = True, **kwargs: Any) -> None:
        _init(self, nn.Conv2d, args, kwargs, r, lora_alpha, lora_dropout, merge_weights)


class Conv3d(LoralibConvKind, nn.Conv3d):
    """loralib's `lora.Conv3d(in_channels, out_channels, kernel_size, r=..., lora_alpha=...)`."""

    lora_base_class = nn.Conv3d

    def __init__(self, *args: Any, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
                 merge_weights: bool = True, **kwargs: Any) -> None:
        _init(self, nn.Conv3d, args, kwargs, r, lora_alpha, lora_dropout, merge_weights)
