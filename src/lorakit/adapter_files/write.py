"""Writing adapter folders exactly as PEFT does: adapter_config.json in PEFT's keys and
adapter_model.safetensors with every trained tensor (LoRA pairs, DoRA magnitudes, modules_to_save, and the
biases bias="all" / "lora_only" trained) under PEFT's key names."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from .. import atomic, pissa
from ..config import LoraConfig
from ..errors import LorakitError
from ..inject import adaptable_modules, base_modules, name_matches
from ..layers.core import LoraLayer
from ..layers.embedding import Embedding
from ..layers.modules_to_save import ModulesToSave
from ..state import find_state, lora_layers, saved_modules
from ..version import __version__
from .layout import CONFIG_NAME, PREFIX, WEIGHTS_NAME, base_key, lora_key

_TASK_MAPPINGS = {  # PEFT's task_type -> transformers' auto-class table of model classes
    "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
}


def adapter_state_dict(model: nn.Module, adapter: str = "default", dtype: torch.dtype | None = None,
                       convert_pissa: bool = True) -> dict[str, Tensor]:
    """One adapter's tensors under PEFT's key names (adapter name stripped), in their own dtype unless asked.

    A PiSSA adapter comes as a plain LoRA pair of twice its rank against the original weights unless
    `convert_pissa=False` (see `save`).
    """
    out: dict[str, Tensor] = {}
    for name, layer in layers_with(model, adapter):
        A, B = _file_pair(layer, adapter, convert_pissa)
        embedding = isinstance(layer, Embedding)
        out[lora_key(name, "A", embedding)] = A
        out[lora_key(name, "B", embedding)] = B
        if adapter in layer.lora_magnitude:
            out[lora_key(name, "M", embedding)] = layer.lora_magnitude[adapter]
    for name, wrapper in saved_modules(model):
        if adapter in wrapper.modules_to_save:
            for tensor_name, tensor in wrapper.modules_to_save[adapter].state_dict().items():
                out[f"{PREFIX}{name}.{tensor_name}"] = tensor
    state = find_state(model)
    cfg = state.configs.get(adapter) if state else None
    if cfg is not None and cfg.bias != "none":
        out.update(_trained_biases(model, adapter, cfg.bias))
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
            for k, v in out.items()}


def adapter_config(model: nn.Module, adapter: str = "default", convert_pissa: bool = True) -> dict[str, Any]:
    """adapter_config.json in PEFT's keys, describing exactly the layers the adapter holds (and, for a PiSSA
    adapter, the file `convert_pissa` chooses)."""
    layers = dict(layers_with(model, adapter))
    shapes = {name: _file_rank_alpha(layer, adapter, convert_pissa) for name, layer in layers.items()}
    state = find_state(model)
    cfg = state.configs.get(adapter) if state else None
    if cfg is not None and pissa.is_pissa(cfg.init) and convert_pissa:
        cfg = pissa.lora_config(cfg)
    elif cfg is not None and pissa.is_pissa(cfg.init):
        _check_repeatable(cfg, adapter)
    if cfg is not None and all((cfg.rank_for(n), cfg.alpha_for(n)) == ra for n, ra in shapes.items()):
        r, alpha, rank_pattern, alpha_pattern = cfg.r, cfg.alpha, cfg.rank_pattern, cfg.alpha_pattern
    else:
        r, alpha, rank_pattern, alpha_pattern = _derived_patterns(shapes)
    spec = next(iter(layers.values())).lora_adapters[adapter]
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": spec.dropout,
        "target_modules": _compact_targets(model, sorted(layers)),
        "exclude_modules": None,
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
        "bias": cfg.bias if cfg else "none",
        "use_rslora": spec.use_rslora,
        "use_dora": spec.use_dora,
        "modules_to_save": [n for n, w in saved_modules(model) if adapter in w.modules_to_save] or None,
        "init_lora_weights": {"kaiming": True}.get(cfg.init, cfg.init) if cfg else True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }


def save(model: nn.Module, out_dir: str | os.PathLike, adapter: str | list[str] | None = "default",
         dtype: torch.dtype | None = None, convert_pissa: bool = True) -> Path:
    """Write adapter folders as PEFT does: one adapter into `out_dir`; None = all adapters, "default" at the
    top and every other one in a subfolder of its name. The folder is swapped in as one unit (readers see the
    old adapter or the new one, never a mix). lorakit's version goes into the safetensors header metadata,
    where PEFT does not warn about it.

    A PiSSA adapter (init="pissa") is written as the whole change against the original weights: a plain
    LoRA pair of rank 2r ([A; A0], [B, -B0]) with alpha keeping the scaling and `init_lora_weights: true`,
    which any LoRA tool applies to the unmodified base. `convert_pissa=False` writes A and B as trained
    (rank r) with `init_lora_weights: "pissa"`: PEFT and lorakit then decompose the original base again when
    loading, so it too goes onto the unmodified base, at the cost of an SVD per layer (not possible for
    "pissa_niter_<k>", whose randomized SVD cannot be repeated).
    """
    out_dir = Path(out_dir)
    names = adapter_names(model) if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
    with atomic.atomic_folder(out_dir, keep_other_files=True) as staging:  # the folder changes as one unit
        for name in names:
            folder = staging if isinstance(adapter, str) or name == "default" else staging / name
            tensors = {k: v.cpu() for k, v in adapter_state_dict(model, name, dtype, convert_pissa).items()}
            config = adapter_config(model, name, convert_pissa)
            metadata = {"format": "pt", "lorakit_version": __version__}
            atomic.write_bytes(folder / WEIGHTS_NAME, save_safetensors(tensors, metadata=metadata))
            atomic.write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def layers_with(model: nn.Module, adapter: str) -> list[tuple[str, LoraLayer]]:
    layers = [(n, m) for n, m in lora_layers(model) if adapter in m.lora_adapters]
    if not layers:
        raise LorakitError(f"the model has no adapter named {adapter!r}; it has {adapter_names(model)}")
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    state = find_state(model)
    if state is not None:
        return list(state.configs)
    return sorted({n for _, layer in lora_layers(model) for n in layer.lora_adapters})


def _trained_biases(model: nn.Module, adapter: str, bias: str) -> dict[str, Tensor]:
    """The biases `set_trainable` trains for this bias mode, named as PEFT names them."""
    out = {}
    for name, module, param, tensor in _biases(model):
        adapted = isinstance(module, LoraLayer)
        if bias == "all" or (adapted and adapter in module.lora_adapters):
            out[base_key(name, param, adapted)] = tensor
    return out


def _biases(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """Every base-model parameter with "bias" in its name, outside modules_to_save copies."""
    for name, module in [("", model), *base_modules(model)]:
        if isinstance(module, ModulesToSave):
            continue
        for param, tensor in module.named_parameters(recurse=False):
            if "bias" in param:
                yield name, module, param, tensor


def _file_pair(layer: LoraLayer, adapter: str, convert_pissa: bool) -> tuple[Tensor, Tensor]:
    """A and B as a plain LoRA pair; fused-part adapters become one block-structured pair (exact)."""
    spec = layer.lora_adapters[adapter]
    if convert_pissa and pissa.origin(layer, adapter) is not None:
        return pissa.lora_pair(layer, adapter)
    A, B = layer.lora_A[adapter], layer.lora_B[adapter]
    if spec.groups is None:
        return A, B
    per_part = B.shape[0] // spec.n_enabled
    full = B.new_zeros(per_part * len(spec.groups), A.shape[0])
    for j, part in enumerate(i for i, on in enumerate(spec.groups) if on):
        full[part * per_part:(part + 1) * per_part, j * spec.r:(j + 1) * spec.r] = B[j * per_part:(j + 1) * per_part]
    return A, full


def _check_repeatable(cfg: LoraConfig, adapter: str) -> None:
    """A file holding a PiSSA adapter's A and B as trained needs a loader to rebuild the same residual."""
    if cfg.init != "pissa":
        raise LorakitError(f"adapter {adapter!r} was started with init={cfg.init!r}, a randomized SVD that a loader "
                           "cannot repeat, so its trained A and B cannot be saved alone; save it converted "
                           "(convert_pissa=True, the default)")


def _file_rank_alpha(layer: LoraLayer, adapter: str, convert_pissa: bool) -> tuple[int, float]:
    """The rank in the file and the alpha that gives this layer's scaling at that rank."""
    spec = layer.lora_adapters[adapter]
    if convert_pissa and pissa.origin(layer, adapter) is not None:
        return pissa.lora_rank_alpha(spec)
    rank = spec.r * spec.n_enabled
    if spec.groups is None:
        return rank, spec.alpha
    return rank, spec.scaling * (math.sqrt(rank) if spec.use_rslora else rank)


def _derived_patterns(shapes: dict[str, tuple[int, float]]) -> tuple[int, float, dict, dict]:
    r = Counter(rank for rank, _ in shapes.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in shapes.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): rank for n, (rank, _) in shapes.items() if rank != r}
    alpha_pattern = {re.escape(n): a for n, (_, a) in shapes.items() if a != alpha}
    return r, alpha, rank_pattern, alpha_pattern


def _compact_targets(model: nn.Module, adapted: list[str]) -> list[str]:
    """Short names (q_proj) when they select exactly the adapted modules, else the full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    selected = {n for n, _ in adaptable_modules(model) if name_matches(short, n)}
    return short if selected == set(adapted) else adapted


def _task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model class, None for anything else."""
    if not type(model).__module__.startswith("transformers."):
        return None
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for task, table in _TASK_MAPPINGS.items():
        classes = getattr(modeling_auto, table, {}).values()
        if any(name == c or (isinstance(c, tuple) and name in c) for c in classes):
            return task
    return None
