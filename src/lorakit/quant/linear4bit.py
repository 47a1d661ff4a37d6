"""Linear4bit: a frozen 4-bit linear layer that trains through its input and saves in bitsandbytes' format."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FormatError, LorakitError
from ..module_tree import is_hf_conv1d
from .codes import QUANT_TYPES
from .tensor import QuantizedTensor, check_config, quantize

_TENSORS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map")
_STATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The (out_features, in_features) weight of an nn.Linear, or the transposed view of a transformers
    Conv1D's (in, out) weight; None for any other module. Both compute x @ W.T + b, so both quantize alike."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_hf_conv1d(type(module)):
        return module.weight.T
    return None


@dataclass(frozen=True)
class _QuantLayout:
    """The non-tensor half of a QuantizedTensor, passed through autograd unchanged."""

    quant_type: str
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    nested_offset: float | None

    def build(self, packed, absmax, quant_map, nested_absmax, nested_quant_map) -> QuantizedTensor:
        return QuantizedTensor(packed.view(-1), absmax, quant_map, self.quant_type, self.blocksize, self.shape,
                               self.dtype, nested_absmax, nested_quant_map, self.nested_offset)


def _linear_not_a_view(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the same kernels, written into a fresh tensor rather than returned as a
    view of a 2-D product: a custom Function's output may then be updated in place (e.g. an adapter adding
    its term to the base output), which autograd forbids for views created inside the Function."""
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    flat, x2 = out.view(-1, weight.shape[0]), x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(x2, weight.T, out=flat)
    else:
        torch.addmm(bias, x2, weight.T, out=flat)
    return out


class _DequantLinear(torch.autograd.Function):
    """x @ W.T + b where W is rebuilt from its 4-bit codes in forward and, by default, again in backward.

    By default only the quantized tensors are saved, so no dense copy of W outlives the step that
    needed it. With `keep` (Linear4bit.keep_dequantized) the forward's dense W is saved for the backward
    instead, trading its memory until then for one dequantize less. W never receives a gradient.
    """

    @staticmethod
    def forward(ctx, x, bias, layout, keep, packed, absmax, quant_map, nested_absmax, nested_quant_map):
        ctx.layout = layout
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype  # as F.linear
        weight = layout.build(packed, absmax, quant_map, nested_absmax, nested_quant_map).dequantize(dtype)
        kept = weight if keep and ctx.needs_input_grad[0] else None
        ctx.save_for_backward(kept, packed, absmax, quant_map, nested_absmax, nested_quant_map)
        return _linear_not_a_view(x.to(dtype), weight, None if bias is None else bias.to(dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            kept, *quantized = ctx.saved_tensors
            weight = kept if kept is not None and kept.dtype == grad_out.dtype else \
                ctx.layout.build(*quantized).dequantize(grad_out.dtype)
            grad_x = grad_out @ weight
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None, None, None, None, None


class Linear4bit(nn.Module):
    """A linear layer whose weight is stored as 4-bit NF4/FP4 codes (QLoRA's frozen base).

    The input is cast to `compute_dtype` and the output is in `compute_dtype`. The weight is dequantized
    inside each forward and backward and dropped right after (or, with `keep_dequantized`, kept from the
    forward for the backward: quant/keep.py); it never gets a gradient. The state dict is bitsandbytes'
    (`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
    `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`, `bias`), so checkpoints move
    between lorakit and bitsandbytes unchanged.
    """

    keep_dequantized: bool = False  # save the forward's dense weight for the backward (more memory, less time)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        double_quant: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_config(quant_type, blocksize)
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None
        qt = QuantizedTensor.zeros((out_features, in_features), quant_type, blocksize, double_quant,
                                   dtype=compute_dtype, device=device)
        self._set_quantized(qt)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        double_quant: bool = True,
    ) -> Linear4bit:
        """Quantize an nn.Linear's weight (on its own device); the bias is copied in `compute_dtype`.

        A transformers Conv1D (GPT-2) is taken as the nn.Linear it computes: its (in, out) weight is
        transposed before quantizing, as transformers' bitsandbytes integration does, so the state dict
        is the one transformers + bitsandbytes write for that model.
        """
        weight = linear_weight(linear)
        if weight is None:
            raise LorakitError(f"from_linear needs a torch.nn.Linear or a transformers Conv1D, got "
                               f"{type(linear).__name__}")
        qt = quantize(weight.detach(), quant_type, blocksize, double_quant)
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias=linear.bias is not None, quant_type=quant_type,
                     compute_dtype=compute_dtype, blocksize=blocksize, double_quant=double_quant, device="meta")
        module._set_quantized(qt)
        if linear.bias is not None:
            bias = linear.bias.detach().to(compute_dtype, copy=True)
            module.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
        return module

    def _set_quantized(self, qt: QuantizedTensor) -> None:
        if tuple(qt.shape) != (self.out_features, self.in_features):
            raise FormatError(f"quantized weight has shape {list(qt.shape)} but this layer is "
                              f"(out_features, in_features) = ({self.out_features}, {self.in_features})")
        # Non-persistent: _save_to_state_dict writes them in bitsandbytes' layout instead.
        self.register_buffer("weight", qt.packed.view(-1, 1), persistent=False)
        for name in _TENSORS[1:]:
            self.register_buffer(name, getattr(qt, name), persistent=False)
        self.quant_type = qt.quant_type
        self.blocksize = qt.blocksize
        self.weight_dtype = qt.dtype
        self.nested_offset = qt.nested_offset

    def _layout(self) -> _QuantLayout:
        shape = torch.Size((self.out_features, self.in_features))
        return _QuantLayout(self.quant_type, self.blocksize, shape, self.weight_dtype, self.nested_offset)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quantized_numel(self) -> int:
        """Elements of the dense weight these codes stand for (lk.count_parameters counts them)."""
        return self.in_features * self.out_features

    @property
    def quantized_weight(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor sharing this module's buffers."""
        return self._layout().build(*(getattr(self, name) for name in _TENSORS))

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (out_features, in_features) weight in `dtype` (default: the dtype it was quantized from)."""
        return self.quantized_weight.dequantize(dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An nn.Linear with the dequantized weight (frozen, as here) and a copy of the bias."""
        weight = self.dequantize_weight(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(weight.dtype, copy=True),
                                       requires_grad=self.bias.requires_grad)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _DequantLinear.apply(x, bias, self._layout(), self.keep_dequantized,
                                    *(getattr(self, name) for name in _TENSORS))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")

    def _apply(self, fn, recurse=True):
        # Statistics stay float32: model.to(torch.bfloat16) or .half() may move them but must not round them.
        before = {name: self._buffers[name] for name in _STATS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bitsandbytes' order: weight, bias, then the statistics
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias, and whatever a subclass adds
        for key, value in self.quantized_weight.to_bnb(prefix + "weight").items():
            if key != prefix + "weight":
                destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        own = {wkey} | {f"{wkey}.{name}" for name in _STATS}
        own |= {f"{wkey}.quant_state.bitsandbytes__{q}" for q in QUANT_TYPES}
        if wkey in state_dict:
            self._load_weight(state_dict, wkey)
        else:
            missing_keys.append(wkey)
        rest = {key: value for key, value in state_dict.items() if key not in own}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _load_weight(self, state_dict, wkey: str) -> None:
        weight = state_dict[wkey]
        device = self.weight.device if not self.weight.is_meta else weight.device
        if weight.is_floating_point() and weight.shape == (self.out_features, self.in_features):
            # A dense checkpoint (e.g. the original model's): quantize it with this layer's settings.
            qt = quantize(weight.to(device), self.quant_type, self.blocksize, self.double_quant)
        else:
            qt = QuantizedTensor.from_bnb(state_dict, wkey).to(device, copy=True)
        if self.bias is not None and self.bias.is_meta:
            self.bias = nn.Parameter(torch.empty_like(self.bias, device=device), self.bias.requires_grad)
        self._set_quantized(qt)
