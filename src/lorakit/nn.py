"""loralib-style building blocks (`lk.nn.Linear(..., r=8)`), the same classes `inject` swaps layers to."""

from __future__ import annotations

from .layers.conv import Conv1d, Conv2d, Conv3d
from .layers.embedding import Embedding
from .layers.linear import Linear, MergedLinear
from .quant import Linear4bit

__all__ = ["Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Linear4bit"]

