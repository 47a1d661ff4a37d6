"""4-bit models as Hugging Face folders in bitsandbytes' serialization, written and read back.

config.json carries transformers' `quantization_config` for bitsandbytes, and model.safetensors holds
each Linear4bit under bitsandbytes' keys (`weight`, `weight.absmax`, `weight.quant_map`, ...), so
transformers with bitsandbytes loads the folder, and lorakit loads it without either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from .. import atomic
from ..errors import FormatError
from ..module_tree import replace_module
from .embedding import QuantTable
from .linear4bit import Linear4bit, linear_weight

QUANT_STATE = ".weight.quant_state.bitsandbytes__"


def save_quantized(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Write a model holding Linear4bit layers; the config records how to load it in 4 bits. Each of
    lorakit's files is written under a temporary name and renamed (the tokenizer writes its own)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise FormatError("the model has no 4-bit layers; quantize it first (lk.quantize_model)")
    if any(isinstance(m, QuantTable) for m in model.modules()):
        raise FormatError("transformers cannot load quantized embeddings from a folder; save model.state_dict() "
                          "instead (docs/formats.md) or quantize without embeddings=")
    first = layers[0]
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": first.quant_type,
        "bnb_4bit_use_double_quant": first.double_quant,
        "bnb_4bit_compute_dtype": str(first.compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": _dense_linears(model),
    }
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:  # a tied weight under its first name only, as transformers saves
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().cpu().contiguous()
    atomic.write_bytes(out / "model.safetensors", save_safetensors(state, metadata={"format": "pt"}))
    atomic.write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def is_quantized_folder(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "bitsandbytes" and bool(quant.get("load_in_4bit"))


def load_quantized(folder: Path, auto: Any) -> nn.Module:
    """Build the architecture, swap in Linear4bit where the file has 4-bit weights, and load."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    quant = config.quantization_config
    del config.quantization_config
    compute_dtype = getattr(torch, quant.get("bnb_4bit_compute_dtype") or "float32")
    model = auto.from_config(config)
    state = load_file(folder / "model.safetensors")
    prefixes = {key[: key.index(QUANT_STATE)] for key in state if QUANT_STATE in key}
    for name in prefixes:
        linear = model.get_submodule(name)
        weight = linear_weight(linear)
        if weight is None:
            raise FormatError(f"{folder}: {name} holds 4-bit weights but is a {type(linear).__name__} in the model")
        out_features, in_features = weight.shape
        replace_module(model, name, Linear4bit(in_features, out_features, bias=linear.bias is not None,
                                               quant_type=quant["bnb_4bit_quant_type"], compute_dtype=compute_dtype,
                                               double_quant=bool(quant.get("bnb_4bit_use_double_quant"))))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _tied(model, k)]
    if missing or unexpected:
        raise FormatError(f"{folder / 'model.safetensors'} does not fit its config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return model.eval()


def _dense_linears(model: nn.Module) -> list[str]:
    """Layers transformers would otherwise load in 4 bits (nn.Linear and Conv1D) that the file keeps dense."""
    return [n for n, m in model.named_modules() if linear_weight(m) is not None]


def _tied(model: nn.Module, key: str) -> bool:
    """A key missing from the file because it is tied to one that is there (e.g. lm_head.weight)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied
