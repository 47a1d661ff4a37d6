"""What a training forward keeps for backward: all that autograd saves, except an activation function's output.

A gated MLP (Llama, Mistral, Qwen, Gemma, Phi-3: down(act(gate(x)) * up(x))) saves three tensors of its
intermediate width per token: act's input, for act's own backward, and act's output and up, for the
product's. The output is a function of the input that autograd keeps anyway, so inside
`lean_saved_activations` it is not kept but computed again when the product's backward asks for it. That is
a third of the MLP's saved memory (a fifth of a Llama layer's) for one elementwise pass in backward, and the
recomputed values are the same bits, so gradients are exactly those of the plain step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LorakitError

# grad_fn class name -> the op again, with the options its node recorded
_RECOMPUTABLE: dict[str, Callable[[object], Callable[[Tensor], Tensor]]] = {
    "SiluBackward0": lambda node: F.silu,
    "GeluBackward0": lambda node: functools.partial(F.gelu, approximate=node._saved_approximate),
}


@dataclass(frozen=True)
class _Recompute:
    """An activation's output, stored as its op and the input autograd keeps for the op's own backward."""

    op: Callable[[Tensor], Tensor]
    source: Tensor
    version: int

    def __call__(self) -> Tensor:
        if self.source._version != self.version:
            raise LorakitError("an activation function's input was changed in place after the forward; its output "
                               "cannot be recomputed for backward (do not modify activations in place during "
                               "training)")
        return self.op(self.source)


def _pack(tensor: Tensor) -> Tensor | _Recompute:
    node = tensor.grad_fn
    recipe = _RECOMPUTABLE.get(type(node).__name__) if node is not None else None
    if recipe is None or tensor._is_view():
        return tensor
    source = node._saved_self
    if source.untyped_storage()._cdata == tensor.untyped_storage()._cdata:  # (fake tensors have no data_ptr)
        return tensor  # computed in place over its input: nothing to recompute from
    return _Recompute(recipe(node), source, source._version)


def _unpack(packed: Tensor | _Recompute) -> Tensor:
    return packed() if isinstance(packed, _Recompute) else packed


@contextlib.contextmanager
def lean_saved_activations(observe: Callable[[Tensor], None] | None = None) -> Iterator[None]:
    """Forwards inside the block save activation outputs as recipes; `observe` sees every tensor actually
    kept (the memory estimate counts them)."""

    def pack(tensor: Tensor) -> Tensor | _Recompute:
        packed = _pack(tensor)
        if observe is not None:
            observe(packed.source if isinstance(packed, _Recompute) else packed)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        yield
