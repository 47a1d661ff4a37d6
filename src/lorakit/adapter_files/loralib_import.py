"""Importing loralib checkpoints (`<layer>.lora_A` / `.lora_B`, e.g. microsoft/LoRA's GPT-2 E2E adapters)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import FormatError
from ..inject import attach, base_modules
from ..layers.core import AdapterSpec
from ..layers.registry import planned_shapes
from .bind import copy_pairs
from .parse import torch_load

CHECKPOINT_KEY = "model_state_dict"  # microsoft/LoRA's training script: torch.save({"model_state_dict": ...})


def load_loralib(model: nn.Module, path_or_state_dict: str | os.PathLike | dict[str, Tensor], alpha: float,
                 r: int | None = None, enable_lora: list[bool] | None = None, adapter: str = "default") -> nn.Module:
    """Load a loralib checkpoint: a state dict, or microsoft/LoRA's `{"model_state_dict": ...}` file.

    loralib files do not store alpha, so it is required. A fused layer whose lora_B covers only part of
    its output (MergedLinear) needs `enable_lora`, e.g. [True, False, True] for GPT-2's c_attn with q and v;
    one with every part enabled is recognised from its shapes.
    """
    state = path_or_state_dict if isinstance(path_or_state_dict, dict) else torch_load(Path(path_or_state_dict))
    source = "state dict" if isinstance(path_or_state_dict, dict) else str(path_or_state_dict)
    if isinstance(state.get(CHECKPOINT_KEY), dict):
        state = state[CHECKPOINT_KEY]
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        key = key.removeprefix("module.")
        for kind in "AB":
            if key.endswith(f".lora_{kind}"):
                pairs.setdefault(key[: -len(".lora_A")], {})[kind] = tensor
    if not pairs:
        raise FormatError(f"{source}: no '*.lora_A' / '*.lora_B' keys; is this a loralib checkpoint?")
    modules = dict(base_modules(model))
    specs: dict[str, AdapterSpec] = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"} or name not in modules:
            raise FormatError(f"{source}: {name} " + ("has only one of lora_A / lora_B" if name in modules
                                                      else "is not a module of this model"))
        spec = _spec(name, modules[name], pair, alpha, r, enable_lora, source)
        expected = planned_shapes(modules[name], spec)
        if (tuple(pair["A"].shape), tuple(pair["B"].shape)) != tuple(map(tuple, expected)):
            raise FormatError(f"{source}: {name} has A {tuple(pair['A'].shape)} and B {tuple(pair['B'].shape)}, "
                              f"the model expects {tuple(expected[0])} and {tuple(expected[1])}")
        specs[name] = spec
    cfg = LoraConfig(r=next(iter(specs.values())).r, alpha=alpha, target_modules=sorted(specs))
    attach(model, adapter, cfg, specs)
    copy_pairs(model, adapter, pairs)
    return model


def _spec(name: str, module: nn.Module, pair: dict[str, Tensor], alpha: float, r: int | None,
          enable_lora: list[bool] | None, source: str) -> AdapterSpec:
    """Plain when A's rows equal B's columns; otherwise a MergedLinear whose A stacks one rank-r block per part."""
    A, B = pair["A"], pair["B"]
    rank = B.shape[1]
    if r is not None and r != rank:
        raise FormatError(f"{source}: {name} has rank {rank}, not r={r}")
    if A.shape[0] == rank and enable_lora is None:
        return AdapterSpec(r=rank, alpha=alpha)
    out_features = planned_shapes(module, AdapterSpec(r=1, alpha=1))[1][0]
    if enable_lora is None:
        if A.shape[0] % rank or B.shape[0] != out_features:
            raise FormatError(f"{source}: {name} lora_A has {A.shape[0]} rows for rank {rank} and lora_B {B.shape[0]} "
                              f"rows for {out_features} outputs, a fused MergedLinear; pass enable_lora (e.g. "
                              "[True, False, True] for GPT-2 c_attn q and v)")
        enable_lora = [True] * (A.shape[0] // rank)
    return AdapterSpec(r=rank, alpha=alpha, groups=tuple(bool(e) for e in enable_lora))
