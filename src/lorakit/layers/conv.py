"""Convolution base kinds (1d/2d/3d, any kernel, groups=1): A is a conv with the base's kernel, B a 1x1 conv."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError
from .core import AdapterSpec, LoraLayer

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvKind(LoraLayer):
    """Hooks for nn.Conv{1,2,3}d; the delta is B·A over (in x kernel), reshaped like the weight."""

    weight: Tensor

    @property
    def lora_out_features(self) -> int:
        return self.out_channels

    def lora_shapes(self, spec: AdapterSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if spec.groups is not None:
            raise LorakitError("enable_lora (fused parts) applies to linear layers only, not convolutions")
        if self.groups != 1:
            raise LorakitError(f"{type(self).__name__} with groups={self.groups} cannot be adapted; only groups=1")
        ones = (1,) * len(self.kernel_size)
        return (spec.r, self.in_channels, *self.kernel_size), (self.out_channels, spec.r, *ones)

    def lora_hidden(self, x: Tensor, A: Tensor) -> Tensor:
        return self._conv_forward(x, A, None)

    def lora_expand(self, h: Tensor, B: Tensor) -> Tensor:
        return _CONV_FUNCTIONS[len(self.kernel_size)](h, B)

    def lora_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.view(self.weight.shape)

    def lora_dense_weight(self) -> Tensor:
        return self.weight.flatten(1)


class Conv1d(ConvKind, nn.Conv1d):
    """nn.Conv1d with adapters in PEFT's layout, as `lk.inject` swaps them (lk.nn.Conv1d is loralib's)."""

    lora_base_class = nn.Conv1d


class Conv2d(ConvKind, nn.Conv2d):
    """nn.Conv2d with adapters in PEFT's layout, as `lk.inject` swaps them (lk.nn.Conv2d is loralib's)."""

    lora_base_class = nn.Conv2d


class Conv3d(ConvKind, nn.Conv3d):
    """nn.Conv3d with adapters in PEFT's layout, as `lk.inject` swaps them (lk.nn.Conv3d is loralib's)."""

    lora_base_class = nn.Conv3d
