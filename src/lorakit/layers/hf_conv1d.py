"""transformers' Conv1D (GPT-2 family): a linear layer whose weight is stored (in, out)."""

from __future__ import annotations

from transformers.pytorch_utils import Conv1D as HFConv1D

from .linear import LinearKind


class Conv1D(LinearKind, HFConv1D):
    """Adapters on GPT-2's Conv1D; files still hold A as (r, in) and B as (out, r)."""

    lora_base_class = HFConv1D
    fan_in_fan_out = True
    lora_fusable_kind = True
