"""loralib-style building blocks (`lk.nn.Linear(..., r=8)`), the same classes `inject` swaps layers to."""

from __future__ import annotations

from typing import Any

from .layers.conv import Conv1d, Conv2d, Conv3d
from .layers.embedding import Embedding
from .layers.linear import Linear, MergedLinear

__all__ = ["Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Linear4bit"]


def __getattr__(name: str) -> Any:
    if name == "Linear4bit":  # the quant package is only imported when asked for
        from .quant import Linear4bit

        return Linear4bit
    raise AttributeError(f"module 'lorakit.nn' has no attribute {name!r}")
