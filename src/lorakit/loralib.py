"""loralib's helpers for models written from scratch with lk.nn layers."""

from __future__ import annotations

from torch import Tensor, nn

from .config import BIAS_MODES
from .errors import LorakitError
from .layers.core import LoraLayer


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze everything but adapter parameters (and biases, per `bias`), as loralib does."""
    _check_bias(bias)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or (bias == "all" and "bias" in name)
    if bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoraLayer) and getattr(module, "bias", None) is not None:
                module.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none", adapter: str = "default") -> dict[str, Tensor]:
    """loralib's checkpoint: `<layer>.lora_A` / `<layer>.lora_B` (and biases), loadable with strict=False."""
    _check_bias(bias)
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_adapters:
            prefix = f"{name}." if name else ""
            out[prefix + "lora_A"] = module.lora_A[adapter].detach()
            out[prefix + "lora_B"] = module.lora_B[adapter].detach()
            if bias == "lora_only" and getattr(module, "bias", None) is not None:
                out[prefix + "bias"] = module.bias.detach()
    if bias == "all":
        out.update({n: p.detach() for n, p in model.named_parameters() if "bias" in n})
    return out


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise LorakitError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
