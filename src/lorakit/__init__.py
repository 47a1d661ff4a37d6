"""lorakit: LoRA and QLoRA for any PyTorch model, in PEFT's file format."""

from . import nn, optim, quant
from .adapters import (
    count_parameters,
    delete_adapter,
    disabled,
    merge,
    route,
    set_active,
    set_trainable,
    unload,
    unmerge,
)
from .config import LoraConfig
from .errors import FormatError, LorakitError
from .inject import add_adapter, inject
from .adapter_files import adapter_state_dict, load, load_loralib, save
from .loralib import lora_state_dict, mark_only_lora_as_trainable
from .quant import dequantize_model, quantization_report, quantize_model
from . import analysis
from .arithmetic import combine, extract, resize

from .version import __version__

__all__ = [
    "__version__",
    "LoraConfig",
    "LorakitError",
    "FormatError",
    "inject",
    "add_adapter",
    "set_active",
    "set_trainable",
    "delete_adapter",
    "disabled",
    "route",
    "merge",
    "unmerge",
    "unload",
    "count_parameters",
    "save",
    "load",
    "load_loralib",
    "adapter_state_dict",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "nn",
    "optim",
    "quant",
    "quantize_model",
    "dequantize_model",
    "quantization_report",
    "combine",
    "resize",
    "extract",
    "analysis",
]
