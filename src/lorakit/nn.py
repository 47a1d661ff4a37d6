"""loralib-style building blocks (`lk.nn.Linear(..., r=8)`): `import lorakit.nn as lora` runs loralib code.

Linear, MergedLinear and Embedding are the classes `inject` swaps layers to; the convolutions follow loralib's
own parametrization (layers/loralib_conv.py). State dicts use loralib's keys, so checkpoints move both ways.
A model built from these layers is a lorakit model like an injected one (see state.adopt). Linear4bit is
different: it is the frozen 4-bit base layer (lorakit.quant), which `inject` adapts like any other base layer.
"""

from __future__ import annotations

from .layers.embedding import Embedding
from .layers.linear import Linear, MergedLinear
from .layers.loralib_conv import Conv1d, Conv2d, Conv3d
from .loralib import lora_state_dict, mark_only_lora_as_trainable
from .quant import Linear4bit

__all__ = ["Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Linear4bit",
           "mark_only_lora_as_trainable", "lora_state_dict"]
