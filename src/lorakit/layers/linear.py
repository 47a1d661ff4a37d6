"""Linear base kinds: nn.Linear (optionally stored in x out, as loralib's fan_in_fan_out) and MergedLinear."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError
from . import fused_linear
from .core import AdapterSpec, LoraLayer
from .loralib_style import LoralibAttributes, use_loralib_keys


class LinearKind(LoraLayer):
    """Hooks shared by every dense projection: A is (r, in), B is (out, r)."""

    fan_in_fan_out: bool = False  # weight stored as (in, out), like transformers' Conv1D
    lora_is_linear = True
    lora_inplace_kind = True

    def lora_shapes(self, spec: AdapterSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if spec.groups is None:
            return (spec.r, self.lora_in_features), (self.lora_out_features, spec.r)
        per_part = self.lora_out_features // len(spec.groups)
        return (spec.r * spec.n_enabled, self.lora_in_features), (per_part * spec.n_enabled, spec.r)

    @property
    def lora_in_features(self) -> int:
        return self.weight.shape[0] if self.fan_in_fan_out else self.weight.shape[1]

    @property
    def lora_out_features(self) -> int:
        return self.weight.shape[1] if self.fan_in_fan_out else self.weight.shape[0]

    def lora_hidden(self, x: Tensor, A: Tensor) -> Tensor:
        return F.linear(x, A)

    def lora_expand(self, h: Tensor, B: Tensor) -> Tensor:
        return F.linear(h, B)

    def lora_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.T if self.fan_in_fan_out else delta

    def lora_dense_weight(self) -> Tensor:
        return self.weight.T if self.fan_in_fan_out else self.weight

    def lora_fused_forward(self, x: Tensor, name: str) -> Tensor | None:
        """The base projection and plain adapter `name` in one function (fused_linear.py), in the dtype the
        unfused path computes in: autocast's, or the one dtype input, weight and adapter share."""
        spec, A, B, weight = self.lora_adapters[name], self.lora_A[name], self.lora_B[name], self.weight
        if (spec.dropout and self.training) or not x.is_floating_point():
            return None  # dropout takes the unfused path
        device = x.device.type
        if torch.is_autocast_enabled(device):
            if torch.float64 in (x.dtype, weight.dtype):
                return None  # autocast leaves float64 alone, and so does F.linear; the unfused path matches it
            dtype = torch.get_autocast_dtype(device)
        elif x.dtype == weight.dtype == A.dtype == B.dtype:
            dtype = weight.dtype
        else:
            return None
        return fused_linear.lora_linear(x, weight, self.bias, A, B, spec.scaling, self.fan_in_fan_out, dtype)


class Linear(LoralibAttributes, LinearKind, nn.Linear):
    """nn.Linear with adapters; also loralib's `lora.Linear` when constructed directly.

    With `merge_weights=True` (loralib's default) `eval()` folds the adapter into the weight and
    `train()` takes it out again.
    """

    lora_base_class = nn.Linear
    lora_fusable_kind = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self.lora_setup(merge_on_eval=merge_weights)
        use_loralib_keys(self)
        if fan_in_fan_out:
            self.fan_in_fan_out = True
            self.weight.data = self.weight.data.T.contiguous()
        if r > 0:
            self.lora_add("default", self._loralib_spec(r, lora_alpha, lora_dropout))
            self.lora_set_active(["default"])
            self.weight.requires_grad = False

    def _loralib_spec(self, r: int, alpha: float, dropout: float) -> AdapterSpec:
        return AdapterSpec(r=r, alpha=alpha, dropout=dropout)

    def lora_base_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.fan_in_fan_out:
            return F.linear(x, self.weight.T, self.bias)
        return self.lora_base_class.forward(self, x, *args, **kwargs)

    def lora_teardown(self) -> None:
        if self.__dict__.pop("fan_in_fan_out", False):
            self.weight.data = self.weight.data.T.contiguous()
        super().lora_teardown()


class MergedLinear(Linear):
    """loralib's MergedLinear: one fused projection (e.g. qkv) whose parts each get their own adapter.

    `enable_lora=[True, False, True]` adapts q and v of a fused qkv; x·A is computed once for all parts.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: Sequence[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        self._enable_lora = tuple(bool(e) for e in enable_lora)
        if out_features % len(self._enable_lora):
            raise LorakitError(
                f"MergedLinear: out_features={out_features} must split evenly into len(enable_lora)="
                f"{len(self._enable_lora)} parts"
            )
        if r > 0 and not any(self._enable_lora):
            raise LorakitError("MergedLinear: enable_lora has no True entry; enable at least one part or use r=0")
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, **kwargs)

    def _loralib_spec(self, r: int, alpha: float, dropout: float) -> AdapterSpec:
        return AdapterSpec(r=r, alpha=alpha, dropout=dropout, groups=self._enable_lora)

