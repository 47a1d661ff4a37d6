"""`lorakit export --format vllm`: an adapter folder that vLLM applies exactly as PEFT does.

vLLM's rules (vllm/lora/peft_helper.py, lora_model.py, lora_weights.py, utils.py): one scaling for the whole
adapter, lora_alpha / r (lora_alpha / sqrt(r) with use_rslora) from adapter_config.json, multiplied into
every lora_B (LoRALayerWeights.optimize); rank_pattern and alpha_pattern are dropped silently
(PEFTHelper.from_dict keeps only its own fields); use_dora and a non-empty modules_to_save are rejected
(PEFTHelper._validate_features), so is bias != "none" (validate_legal) and r above --max-lora-rank, whose
allowed values are 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16). Subfolders are not read: each adapter
is its own path.

The export folds each module's own scaling into lora_B, pads every pair to the largest rank R with zero rows
of A and zero columns of B (which add nothing to B·A), and writes r = lora_alpha = R, use_rslora false:
vLLM's scaling is then 1 for every module and every tensor has the rank the config states, the layout of a
plain adapter, so the update vLLM applies is exactly PEFT's. (vLLM copies each pair into rank-max_lora_rank
buffers by its own shape, so padding costs file size, not compute.)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from .. import atomic
from ..adapter_files import CONFIG_NAME, PREFIX, WEIGHTS_NAME, save
from ..version import __version__
from .scaled import ExportRefused, ScaledAdapter, read_scaled

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
VLLM_DEFAULT_MAX_LORA_RANK = 16


@dataclass
class VllmExport:
    """What was written and the flag vLLM needs to load it."""

    out: Path
    rank: int  # every module's rank in the file (the largest of the source)
    max_lora_rank: int  # the smallest value of vLLM's --max-lora-rank that admits `rank`
    modules: int
    padded: list[str]  # modules whose rank was raised to `rank` with zeros
    folded: dict[str, float]  # module -> the scaling folded into its lora_B
    other_adapters: list[str]  # subfolders of the source holding further adapters (vLLM reads none of them)

    @property
    def vllm_flags(self) -> str:
        return "--enable-lora" + (f" --max-lora-rank {self.max_lora_rank}"
                                  if self.max_lora_rank != VLLM_DEFAULT_MAX_LORA_RANK else "")


def to_vllm(folder_or_model: str | os.PathLike | nn.Module, out: str | os.PathLike, adapter: str = "default",
            dtype: torch.dtype | None = None) -> VllmExport:
    """Write `out/` (adapter_config.json + adapter_model.safetensors) for `vllm serve --enable-lora`.

    `folder_or_model` is an adapter folder (lorakit's or PEFT's) or a model holding lorakit adapter `adapter`.
    Tensors keep the source dtype unless `dtype` is given; the folding is computed in float32.
    """
    if isinstance(folder_or_model, nn.Module):
        with tempfile.TemporaryDirectory() as tmp:
            save(folder_or_model, tmp, adapter=adapter)
            return _export(read_scaled(tmp, "vLLM"), Path(out), dtype, source=None)
    return _export(read_scaled(folder_or_model, "vLLM"), Path(out), dtype, source=Path(folder_or_model))


def _export(adapter: ScaledAdapter, out: Path, dtype: torch.dtype | None, source: Path | None) -> VllmExport:
    rank = adapter.rank
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        raise ExportRefused(f"{adapter.folder}: rank {rank} is above vLLM's largest --max-lora-rank "
                            f"({VLLM_MAX_LORA_RANKS[-1]}); lower it with lorakit resize, or merge the adapter")
    if source is not None and out.resolve() == source.resolve():
        raise ExportRefused(f"{out}: the export would overwrite its source; choose another --out folder")
    dtype = dtype or adapter.dtype
    tensors = {}
    for module, pair in adapter.pairs.items():
        kind = "lora_embedding_{}" if pair.embedding else "lora_{}.weight"
        A, B = _padded(pair.A, pair.B, rank)
        tensors[f"{PREFIX}{module}.{kind.format('A')}"] = A.to(dtype).contiguous()
        tensors[f"{PREFIX}{module}.{kind.format('B')}"] = B.to(dtype).contiguous()
    source_config = adapter.config
    config = {
        "peft_type": "LORA",
        "task_type": source_config.get("task_type"),
        "base_model_name_or_path": source_config.get("base_model_name_or_path"),
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "modules_to_save": None,
        "target_modules": sorted(adapter.pairs),
        "exclude_modules": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": source_config.get("lora_dropout", 0.0),
        "fan_in_fan_out": bool(source_config.get("fan_in_fan_out", False)),
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
        "lorakit_version": __version__,
    }
    atomic.write_bytes(out / WEIGHTS_NAME, save_safetensors(tensors, metadata={"format": "pt"}))
    atomic.write_text(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    others = sorted(p.name for p in source.iterdir() if (p / CONFIG_NAME).is_file()) if source else []
    return VllmExport(
        out=out,
        rank=rank,
        max_lora_rank=next(r for r in VLLM_MAX_LORA_RANKS if r >= rank),
        modules=len(adapter.pairs),
        padded=sorted(m for m, p in adapter.pairs.items() if p.A.shape[0] < rank),
        folded={m: p.scaling for m, p in adapter.pairs.items()},
        other_adapters=others,
    )


def _padded(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A with zero rows and B with zero columns up to `rank`: B·A is unchanged."""
    extra = rank - A.shape[0]
    return torch.nn.functional.pad(A, (0, 0, 0, extra)), torch.nn.functional.pad(B, (0, extra))
