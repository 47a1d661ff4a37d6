"""Reading a PEFT-layout adapter folder on its own (no model needed): its config, checked key by key, and its
tensors split into LoRA pairs and the other tensors (modules_to_save, trained biases, embedding weights)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor

from ..config import LoraConfig
from ..errors import FormatError, LorakitError
from .config_keys import check_keys
from .layout import CONFIG_NAME, LEGACY_WEIGHTS_NAME, LORA_BIAS_SUFFIXES, PREFIX, WEIGHTS_NAME, split_lora_key


@dataclass
class AdapterFile:
    """A parsed adapter folder: its config and tensors grouped by module."""

    folder: Path
    config: dict[str, Any]
    pairs: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module -> {"A": .., "B": .., "M": ..}
    saved: dict[str, Tensor] = field(default_factory=dict)  # every other tensor, by its name in the model

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS_NAME


def read_adapter(folder: str | os.PathLike) -> AdapterFile:
    """Read and check a folder; errors name the file, the key, and the option involved."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: no such adapter folder")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file() and (folder / "trainer_state.json").is_file():
        raise FormatError(f"{folder}: a Trainer checkpoint without an adapter folder: its model.safetensors holds the "
                          "whole model but not the LoRA settings (alpha, patterns); train with callbacks="
                          "[lorakit.integrations.LorakitCallback()], which writes the adapter into every checkpoint")
    if not config_path.is_file():
        raise FormatError(f"{folder}: {CONFIG_NAME} is missing; is this an adapter folder written by lorakit or PEFT?")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{config_path}: not valid JSON ({exc}); the file is corrupt, save the adapter again") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise FormatError(f"{config_path}: peft_type is {found!r}; lorakit reads LoRA adapters (peft_type 'LORA')")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise FormatError(f"{config_path}: {key!r} is missing or not a number")
    check_keys(config, config_path)
    parsed = AdapterFile(folder, config)
    for key, tensor in read_tensors(folder).items():
        if not key.startswith(PREFIX):
            raise FormatError(f"{parsed.weights}: key {key!r} does not start with {PREFIX!r} (not PEFT's layout)")
        if key.endswith(LORA_BIAS_SUFFIXES):
            raise FormatError(f"{parsed.weights}: key {key!r} is a bias on lora_B (PEFT's lora_bias=True), "
                              "which lorakit does not support")
        module, kind = split_lora_key(key[len(PREFIX):])
        if kind is None:
            parsed.saved[module] = tensor
        else:
            parsed.pairs.setdefault(module, {})[kind] = tensor
    for module, pair in parsed.pairs.items():
        if not {"A", "B"} <= set(pair):
            missing = "lora_B" if "A" in pair else "lora_A"
            raise FormatError(f"{parsed.weights}: {module} has no {missing} tensor; the file is incomplete")
        if pair["A"].shape[0] != pair["B"].shape[1]:
            raise FormatError(
                f"{parsed.weights}: {module} lora_A is {tuple(pair['A'].shape)} but lora_B is "
                f"{tuple(pair['B'].shape)}; their ranks disagree"
            )
    if not parsed.pairs:
        raise FormatError(f"{parsed.weights}: holds no LoRA tensors")
    return parsed


def config_from_file(file: AdapterFile) -> LoraConfig:
    """The LoraConfig the file's settings amount to (targets = the modules it holds tensors for)."""
    config = file.config
    try:
        return LoraConfig(
            init="pissa" if config.get("init_lora_weights") == "pissa" else "kaiming",
            r=int(config["r"]),
            alpha=config["lora_alpha"],
            dropout=float(config.get("lora_dropout") or 0.0),
            target_modules=sorted(file.pairs),
            bias=config.get("bias") or "none",
            use_rslora=bool(config.get("use_rslora", False)),
            use_dora=bool(config.get("use_dora", False)),
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
            modules_to_save=list(config.get("modules_to_save") or []),
        )
    except LorakitError as exc:
        raise FormatError(f"{file.folder / CONFIG_NAME}: {exc}") from None


def read_tensors(folder: Path) -> dict[str, Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        if (folder / LEGACY_WEIGHTS_NAME).is_file():
            return torch_load(folder / LEGACY_WEIGHTS_NAME)
        raise FormatError(f"{folder}: {WEIGHTS_NAME} is missing")
    try:
        return load_safetensors(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc}); it is truncated or corrupt, "
                          "save the adapter again") from None


def torch_load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except Exception as exc:  # torch raises many kinds for a damaged pickle
        raise FormatError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    if not isinstance(state, dict):
        raise FormatError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state
