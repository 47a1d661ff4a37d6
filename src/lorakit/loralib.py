"""loralib's helpers (`mark_only_lora_as_trainable`, `lora_state_dict`) for models built from lk.nn layers,
with loralib's exact rules, so `import lorakit.nn as lora` runs loralib training scripts unchanged."""

from __future__ import annotations

from torch import Tensor, nn

from .config import BIAS_MODES
from .errors import LorakitError
from .layers.core import LoraLayer
from .layers.loralib_conv import LoralibConvKind


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter that is not a LoRA one (LoRA parameters keep their own setting, so one the user
    froze stays frozen), then unfreeze biases per `bias`: "all" every one, "lora_only" those of LoRA layers
    (not convolutions, whose bias loralib keeps inside the wrapped conv), as loralib does."""
    _check_bias(bias)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.requires_grad = False
    for name, param in model.named_parameters():
        if bias == "all" and "bias" in name:
            param.requires_grad = True
    if bias == "lora_only":
        for module in model.modules():
            if _own_bias(module) is not None:
                module.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none", adapter: str = "default") -> dict[str, Tensor]:
    """loralib's checkpoint: `<layer>.lora_A` / `<layer>.lora_B` (and biases per `bias`, under the names the
    model's state_dict gives them), loadable with strict=False into lk.nn and loralib models alike."""
    _check_bias(bias)
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_adapters:
            prefix = f"{name}." if name else ""
            out[prefix + "lora_A"] = module.lora_A[adapter].detach()
            out[prefix + "lora_B"] = module.lora_B[adapter].detach()
            if bias == "lora_only" and _own_bias(module) is not None:
                out[prefix + "bias"] = module.bias.detach()
    if bias == "all":
        out.update({k: v for k, v in model.state_dict().items() if "bias" in k and "lora_" not in k})
    return out


def _own_bias(module: nn.Module) -> Tensor | None:
    """The bias loralib's "lora_only" trains: a LoRA layer's own, not a wrapped convolution's."""
    if not isinstance(module, LoraLayer) or isinstance(module, LoralibConvKind):
        return None
    return getattr(module, "bias", None)


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise LorakitError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
