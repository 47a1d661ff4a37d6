"""loralib-style building blocks for models written from scratch (`lk.nn.Linear(..., r=8)`).

Linear, MergedLinear, Embedding and Conv1d/2d/3d are the LoRA layer classes `inject` swaps layers to, so a
model built from them is a lorakit model like an injected one (see state.adopt). Linear4bit is different:
it is the frozen 4-bit base layer (lorakit.quant), which `inject` adapts like any other base layer.
"""

from __future__ import annotations

from .layers.conv import Conv1d, Conv2d, Conv3d
from .layers.embedding import Embedding
from .layers.linear import Linear, MergedLinear
from .quant import Linear4bit

__all__ = ["Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Linear4bit"]
