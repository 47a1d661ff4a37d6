"""LoRA layers: one shared core (core.py) and one small file per base kind."""

from .core import AdapterSpec, LoraLayer

__all__ = ["AdapterSpec", "LoraLayer"]
