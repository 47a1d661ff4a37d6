"""Mixed-adapter batches: row i of a batch runs through adapter names_per_row[i] (None = base only).

Two ways to compute the rows' terms, both exact:
- "group": one pass per adapter over its rows (index_select, the adapter's term, index_add). Few
  calls when a batch holds one or two adapters; any layer kind, DoRA and dropout included.
- "gather": every row's A and B gathered into (rows, r_max, in) / (rows, out, r_max) stacks (smaller
  ranks padded with zeros, base rows all zeros) and two batched matmuls for the whole batch. The cost no
  longer grows with the number of adapters; the gathered stacks are cached for the whole `lk.route`
  block while the weights stay unchanged (e.g. every step of `generate`). Plain linear adapters only.
"auto" groups on a block's first call and gathers from the second call on (the stacks are then reused) when
most rows have an adapter of their own: bench/bench_route.py measured grouping as fast or faster for single
calls, and gathering 2x faster than grouping over generate-like steps with 64 adapters in a batch of 64.

A server changes its batch at almost every step, so per-block gathered stacks rarely get reused there:
lorakit/layers/adapter_bank.py keeps persistent stacks instead and plugs in as a `RoutePlan` subclass
(`add_terms` is the one method a plan's layer calls to add the rows' terms).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LorakitError
from . import inplace_autograd

if TYPE_CHECKING:
    from .core import LoraLayer

STRATEGIES = ("auto", "gather", "group")


class RoutePlan:
    """Which adapter each row uses, shared by every layer inside one `lk.route` block."""

    def __init__(self, names_per_row: Sequence[str | None], strategy: str = "auto") -> None:
        if strategy not in STRATEGIES:
            raise LorakitError(f"lk.route strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.names = tuple(names_per_row)
        self.rows = len(self.names)
        self.strategy = strategy
        self.distinct = tuple(dict.fromkeys(n for n in self.names if n is not None))
        self._indices: dict[tuple, Tensor] = {}
        self._weights: dict[int, tuple] = {}  # id(layer) -> (key, A rows, B rows, scaling)
        self._seen: set[int] = set()  # layers that already ran once in this block

    def rows_of(self, name: str, device: torch.device) -> Tensor:
        key = (name, device)
        if key not in self._indices:
            self._indices[key] = torch.tensor([i for i, n in enumerate(self.names) if n == name], device=device)
        return self._indices[key]

    def fit_rows(self, x: Tensor, out: Tensor, layer_name: str) -> tuple[Tensor, Tensor]:
        """Broadcast inputs shared by every row (batch 1), and refuse batches of the wrong size."""
        if x.shape[0] == 1 and self.rows > 1:  # e.g. position embeddings computed once for all rows
            x, out = x.expand(self.rows, *x.shape[1:]), out.expand(self.rows, *out.shape[1:])
        if x.shape[0] != self.rows:
            raise LorakitError(
                f"lk.route was given {self.rows} rows but {layer_name} sees a batch of {x.shape[0]}; route "
                "one name per row of the batch (beam search multiplies rows: repeat names)"
            )
        return x, out

    def wants_gather(self, layer: LoraLayer, names: tuple[str, ...]) -> bool:
        """"auto": gather once the gathered weights can be reused (this layer already ran in the block, e.g.
        generate's decode steps, without gradients) and most rows have an adapter of their own; copying
        per-row weights for one call, or for many rows sharing few adapters, costs more than grouping."""
        if self.strategy != "auto":
            return self.strategy == "gather"
        reused = id(layer) in self._seen and not torch.is_grad_enabled()
        self._seen.add(id(layer))
        return reused and 1 < len(names) and self.rows <= 2 * len(names)

    def add_terms(self, layer: LoraLayer, names: tuple[str, ...], x: Tensor, out: Tensor) -> Tensor:
        """out + every row's own term (`names`: this layer's adapters among the rows'; wants_gather agreed)."""
        return gathered(layer, self, names, x, out)

    def row_weights(self, layer: LoraLayer, names: tuple[str, ...], dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """Every row's A (rows, r_max, in), B (rows, out, r_max) and scaling (rows, 1, 1); cached while
        nothing trains them."""
        params = [p for n in names for p in (layer.lora_A[n], layer.lora_B[n])]
        trained = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if trained or torch.compiler.is_compiling():  # a compiled graph gathers inside itself
            return _gather(layer, self.names, names, dtype)
        key = (names, dtype, torch.is_inference_mode_enabled(), *((p._version, p.data_ptr()) for p in params))
        cached = self._weights.get(id(layer))
        if cached is None or cached[0] != key:
            cached = (key, *_gather(layer, self.names, names, dtype))
            self._weights[id(layer)] = cached
        return cached[1:]


def _gather(layer: LoraLayer, row_names: tuple[str | None, ...], names: tuple[str, ...], dtype: torch.dtype
            ) -> tuple[Tensor, Tensor, Tensor]:
    """One copy per row of its adapter's A and B (zeros for base rows), ranks padded to the largest."""
    specs = {n: layer.lora_adapters[n] for n in names}
    r_max = max(spec.r for spec in specs.values())
    A = {n: F.pad(layer.lora_A[n].to(dtype), (0, 0, 0, r_max - s.r)) for n, s in specs.items()}
    B = {n: F.pad(layer.lora_B[n].to(dtype), (0, r_max - s.r)) for n, s in specs.items()}
    first = names[0]
    A_zero, B_zero = A[first].new_zeros(A[first].shape), B[first].new_zeros(B[first].shape)
    rows = [n if n in specs else None for n in row_names]
    A_rows = torch.stack([A[n] if n else A_zero for n in rows])
    B_rows = torch.stack([B[n] if n else B_zero for n in rows])
    scaling = torch.tensor([specs[n].scaling if n else 0.0 for n in rows], dtype=dtype, device=A_rows.device)
    return A_rows, B_rows, scaling.view(-1, 1, 1)


def can_gather(layer: LoraLayer, names: tuple[str, ...]) -> bool:
    """Plain linear adapters only; dropout in training draws a mask per adapter, so it groups."""
    if not layer.lora_inplace_kind:
        return False
    specs = [layer.lora_adapters[n] for n in names]
    return all(s.groups is None and not s.use_dora and not (s.dropout and layer.training) for s in specs)


def gathered(layer: LoraLayer, plan: RoutePlan, names: tuple[str, ...], x: Tensor, out: Tensor) -> Tensor:
    """out + every row's own term, from two batched matmuls over the whole batch (`RoutePlan.add_terms`)."""
    dtype = inplace_autograd.compute_dtype(x, layer.lora_A[names[0]])
    A_rows, B_rows, scaling = plan.row_weights(layer, names, dtype)
    rows, features = plan.rows, out.shape[-1]
    h = torch.bmm(x.reshape(rows, -1, x.shape[-1]).to(dtype), A_rows.transpose(1, 2)) * scaling
    out3 = out.reshape(rows, -1, features)
    if torch.is_grad_enabled() and (out.requires_grad or h.requires_grad):
        if out.dtype == dtype:
            return torch.baddbmm(out3, h, B_rows.transpose(1, 2)).view(out.shape)
        return (out3 + torch.bmm(h, B_rows.transpose(1, 2)).to(out.dtype)).view(out.shape)
    if not out3.is_contiguous():  # an expanded batch-1 output
        out3 = out3.contiguous()
    if out.dtype == dtype:
        out3.baddbmm_(h, B_rows.transpose(1, 2))
    else:
        out3.add_(torch.bmm(h, B_rows.transpose(1, 2)))
    return out3.view(out.shape)
