"""LoRA layers: one shared core (core.py), one small file per base kind, one per adapter variant."""

from . import dora, plain_lora  # the built-in variants register themselves (variant.py)
from .core import AdapterSpec, LoraLayer

__all__ = ["AdapterSpec", "LoraLayer"]
