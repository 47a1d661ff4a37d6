"""QLoRA's base kind: adapters on lorakit's 4-bit Linear4bit, whose weight stays quantized and frozen."""

from __future__ import annotations

import torch
from torch import Tensor

from ..quant.linear4bit import Linear4bit
from .linear import LinearKind


class LoraLinear4bit(LinearKind, Linear4bit):
    """The base runs on the 4-bit weight (dequantized per call); A and B are ordinary float tensors."""

    lora_base_class = Linear4bit
    lora_merge_blocker = ("its weight is stored in 4 bits; keep the adapter unmerged, or merge with "
                          "lk.unload(model, merge=True, dequantize=True) for an exact 16-bit merged model, or with "
                          "lk.quant.merge_into_4bit(model) to stay in 4 bits (requantizing adds error; it reports how "
                          "much)")

    def lora_dense_weight(self) -> Tensor:
        return self.dequantize_weight(torch.float32)

    @property
    def lora_in_features(self) -> int:
        return self.in_features

    @property
    def lora_out_features(self) -> int:
        return self.out_features
