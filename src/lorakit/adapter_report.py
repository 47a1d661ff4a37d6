"""What an adapter folder holds, without a base model: the data behind `lorakit inspect`."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter_files import read_adapter
from .config import lora_scaling, pattern_value


@dataclass
class LayerReport:
    module: str
    rank: int
    in_features: int
    out_features: int
    scaling: float
    delta_norm: float  # Frobenius norm of scaling * B·A, the size of the change to this weight


@dataclass
class AdapterReport:
    folder: str
    config: dict[str, Any]
    file_bytes: int
    dtypes: list[str]
    parameters: int
    layers: list[LayerReport] = field(default_factory=list)
    saved_tensors: list[str] = field(default_factory=list)

    @property
    def base_model(self) -> str:
        return self.config.get("base_model_name_or_path") or "not recorded"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"base_model": self.base_model}


def describe_adapter(folder: str | os.PathLike) -> AdapterReport:
    file = read_adapter(folder)
    config = file.config
    tensors = [t for pair in file.pairs.values() for t in pair.values()] + list(file.saved.values())
    report = AdapterReport(
        folder=str(Path(folder)),
        config=config,
        file_bytes=sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file()),
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
        parameters=sum(t.numel() for t in tensors),
        saved_tensors=sorted(file.saved),
    )
    for module, pair in sorted(file.pairs.items()):
        A, B = pair["A"].float().flatten(1), pair["B"].float().flatten(1)
        rank = A.shape[0]
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scaling = lora_scaling(rank, alpha, bool(config.get("use_rslora")))
        report.layers.append(LayerReport(
            module=module,
            rank=rank,
            in_features=A.shape[1],
            out_features=B.shape[0],
            scaling=scaling,
            delta_norm=scaling * _product_norm(A, B),
        ))
    return report


def rank_summary(report: AdapterReport) -> str:
    counts = Counter(layer.rank for layer in report.layers)
    return ", ".join(f"r={rank} x{n}" for rank, n in sorted(counts.items()))


def _product_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """||B·A||_F from two r x r Gram matrices, without forming the (out, in) product."""
    return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt())

