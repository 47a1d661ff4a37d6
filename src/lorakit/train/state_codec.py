"""Nested training state (optimizer and scheduler state dicts, RNG states, history) as JSON plus a dict of
tensors for safetensors: the code-free replacement for pickling it.

Only data comes back: dicts, lists, tuples, str, int, float (NaN and infinities included), bool, None,
tensors and NumPy arrays. A tag object {"__kind__": ...} marks what plain JSON cannot say.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

KIND = "__kind__"


def encode(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(a JSON-ready tree, the tensors it refers to by key)."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(value, tensors), tensors


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value `encode` was given, rebuilt from its tree and tensors."""
    if isinstance(tree, list):
        return [decode(item, tensors) for item in tree]
    if not isinstance(tree, dict):
        return tree
    kind = tree.get(KIND)
    if kind is None:
        return {key: decode(item, tensors) for key, item in tree.items()}
    if kind == "tuple":
        return tuple(decode(item, tensors) for item in tree["items"])
    if kind == "dict":
        return {decode(k, tensors): decode(v, tensors) for k, v in tree["items"]}
    if kind == "float":
        return float(tree["value"])  # "nan", "inf", "-inf"
    if kind == "tensor":
        return tensors[tree["key"]].clone()
    if kind == "ndarray":
        return tensors[tree["key"]].numpy().astype(tree["dtype"])
    raise ValueError(f"unknown entry kind {kind!r} in the training state")


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {KIND: "tensor", "key": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value)).clone()
        return {KIND: "ndarray", "key": key, "dtype": value.dtype.str}
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else {KIND: "float", "value": str(value)}
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, tuple):
        return {KIND: "tuple", "items": [_encode(item, tensors) for item in value]}
    if isinstance(value, list):
        return [_encode(item, tensors) for item in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and KIND not in value:
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {KIND: "dict", "items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")
