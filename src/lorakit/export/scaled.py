"""An adapter folder reduced to what every serving engine applies: one plain pair per module, scaling folded in.

PEFT scales each module by alpha/r (alpha/sqrt(r) with rsLoRA), with per-module alpha and r from
alpha_pattern / rank_pattern. vLLM and llama.cpp read one global alpha and no patterns, so the exports start
from each module's pair with its true scaling multiplied into lora_B (B·A = scaling·B_file·A_file, computed
in float32) and choose a global alpha that makes the engine's own scaling cancel out.

What no plain pair can carry is refused before anything is written: DoRA, trained biases, modules_to_save,
and adapters whose tensors go with a rewritten base (raw PiSSA, OLoRA, CorDA, LoftQ).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapter_files import read_adapter
from ..adapter_files.layout import LEGACY_WEIGHTS_NAME, PREFIX, WEIGHTS_NAME
from ..config import pattern_value
from ..errors import LorakitError

REWRITTEN_BASE_INITS = ("pissa", "olora", "corda", "loftq")  # PEFT inits that change the base weights


class ExportRefused(LorakitError):
    """The adapter uses a feature the target engine cannot apply; the message names it and the way out."""


@dataclass
class ScaledPair:
    """One module's update as A (r, in) and B (out, r), float32, with B·A = scaling·B_file·A_file."""

    A: Tensor
    B: Tensor
    scaling: float  # what was folded into B
    embedding: bool  # stored as lora_embedding_A/B (an nn.Embedding), else lora_A/B.weight


@dataclass
class ScaledAdapter:
    folder: Path
    config: dict[str, Any]
    pairs: dict[str, ScaledPair]  # module path (no base_model.model. prefix) -> pair
    dtype: torch.dtype  # the dtype of the file's tensors

    @property
    def rank(self) -> int:
        """The largest rank of any module."""
        return max(pair.A.shape[0] for pair in self.pairs.values())


def read_scaled(folder: str | os.PathLike, engine: str) -> ScaledAdapter:
    """Read an adapter folder (lorakit's or PEFT's) and fold scaling into B; `engine` names the target in refusals."""
    file = read_adapter(folder)
    _refuse_unsupported(file.folder, file.config, file.pairs, file.saved, engine)
    embeddings = _embedding_modules(file.folder)
    rslora = bool(file.config.get("use_rslora"))
    pairs = {}
    for module, pair in sorted(file.pairs.items()):
        A, B = pair["A"], pair["B"]
        if A.dim() != 2:
            raise ExportRefused(f"{file.folder}: {module} is a convolution adapter (A {tuple(A.shape)}); {engine} "
                                "applies LoRA to linear and embedding layers only. Merge it instead (lorakit merge)")
        rank = A.shape[0]
        alpha = pattern_value(file.config.get("alpha_pattern") or {}, module, file.config["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        pairs[module] = ScaledPair(A.float(), B.float() * scaling, scaling, module in embeddings)
    dtype = next(iter(file.pairs.values()))["A"].dtype
    return ScaledAdapter(file.folder, file.config, pairs, dtype)


def _refuse_unsupported(folder: Path, config: dict[str, Any], pairs: dict[str, dict[str, Tensor]],
                        saved: dict[str, Tensor], engine: str) -> None:
    reasons = []
    if config.get("use_dora") or any("M" in pair for pair in pairs.values()):
        reasons.append("it is a DoRA adapter (use_dora): the magnitude vector rescales every output column of W + ΔW, "
                       "which no LoRA pair can express")
    biases = sorted(k for k in saved if k.endswith(".bias"))
    if (config.get("bias") or "none") != "none" or config.get("lora_bias") or biases:
        bias, lora_bias = config.get("bias"), config.get("lora_bias", False)
        reasons.append(f"it trained biases (bias={bias!r}, lora_bias={lora_bias!r}, tensors {biases[:3]}), "
                       "which a LoRA pair cannot carry")
    whole = sorted(k for k in saved if not k.endswith(".bias"))
    if config.get("modules_to_save") or whole:
        names = config.get("modules_to_save") or whole
        reasons.append(f"it trains whole modules (modules_to_save={names}), which {engine} does not load")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.split("_niter_")[0] in REWRITTEN_BASE_INITS:
        reasons.append(f"init_lora_weights is {init!r}: its A and B go with a base whose weights were rewritten at "
                       f"initialization, while {engine} applies them to the unmodified base (wrong outputs); save it "
                       "converted first (lk.save does by default; PEFT: path_initial_model_for_weight_conversion=...)")
    if reasons:
        raise ExportRefused(f"{folder}: cannot export for {engine}: " + "; ".join(reasons) + ". Merge it into the "
                            "base instead (lorakit merge --adapter ...) and serve the merged model.")


def _embedding_modules(folder: Path) -> set[str]:
    """Modules stored under PEFT's embedding names (lora_embedding_A/B); the engines treat them differently."""
    from safetensors import safe_open

    if (folder / WEIGHTS_NAME).is_file():
        with safe_open(folder / WEIGHTS_NAME, framework="pt") as handle:
            keys = list(handle.keys())
    else:
        keys = list(torch.load(folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True))
    suffix = ".lora_embedding_A"
    return {k[len(PREFIX):].split(suffix)[0] for k in keys if suffix in k}
