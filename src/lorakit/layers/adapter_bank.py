"""Persistent per-layer adapter tables for a server, and the route plan that reads rows' adapters from them.

A server changes its batch at almost every step, so nothing per batch may copy adapter weights. `AdapterBank`
keeps every loaded plain adapter's A and B in per-layer tables (one slot per adapter, ranks zero-padded to
the largest, the adapter's scaling folded into B), written once when the adapter is loaded and zeroed
when it is removed. A `BankedRoutePlan` turns a batch's adapter names into slot indices, once per batch
and layer shape, and each layer adds its rows' terms from the tables (lorakit/layers/indexed_matmul.py):
- one or two tokens per row (a decode step): `embedding_bag` reads each row's weights in place, no copy;
- more tokens per row (a prompt): each row's weights are copied once and multiplied with all its tokens,
  because bags would read them once per token (`BAG_TOKENS`); without autograd the second matmul adds
  straight into the layer's output, every row taking part (the empty slot 0 for rows the layer does not
  adapt) unless fewer than half of them are routed;
- a compute dtype other than the tables' (autocast) or one embedding_bag lacks: copied, then multiplied.
Rows whose adapter the layer lacks (the base, or an adapter with other targets) are left out or read the
empty slot; that and the zero padding of smaller ranks add exact zeros, so a row's output never depends on
the other rows'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import Tensor

from ..errors import LorakitError
from . import inplace_autograd
from .indexed_matmul import BAG_DTYPES, bag_index, bag_lora, gathered_lora, gathered_lora_into
from .routing import RoutePlan, can_gather

if TYPE_CHECKING:
    from .core import LoraLayer

# Most tokens per row that go through bags. Bags read a row's weights once per token (the later reads mostly
# from cache), a gather copies them once and multiplies all tokens: over SmolLM2-135M's projections with r=16
# bags took about 0.7x the gather's time at 1 token per row, 0.8x at 2, even at 3, 1.1x at 4, 1.7x at 32
# (one thread, relative times on a loaded host).
BAG_TOKENS = 2


class AdapterBank:
    """Per-layer tables of the plain adapters: A (slots, in, r_max) holding A_sᵀ, B (slots, r_max, out)
    holding (scaling_s·B_s)ᵀ. An adapter occupies the same slot in every layer it adapts; slot 0 stays
    unused (empty). Adapters the bank cannot hold (DoRA, fused groups, non-linear kinds) are left to grouping."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity  # most adapters held at once, if known: tables never grow past it + 1 slots
        self.slots: dict[str, int] = {}  # adapter name -> slot (>= 1)
        self.stacks: dict[int, tuple[Tensor, Tensor]] = {}  # id(layer) -> (A table, B table)
        self.layers: dict[int, LoraLayer] = {}  # holds each layer, so no other object can take its id
        self.covered: dict[int, frozenset[str]] = {}  # id(layer) -> adapters held in its tables

    def add(self, layers: Iterable[LoraLayer], name: str) -> None:
        """Copy adapter `name` from every layer that has it into a free slot, growing tables as needed."""
        if name in self.slots:
            raise LorakitError(f"adapter {name!r} is already in the bank")
        used = set(self.slots.values())
        slot = next(i for i in range(1, len(used) + 2) if i not in used)
        self.slots[name] = slot
        for layer in layers:
            spec = layer.lora_adapters.get(name)
            if spec is None or not can_gather(layer, (name,)):
                continue
            key = id(layer)
            self.layers[key] = layer
            A_new, B_new = layer.lora_A[name].detach(), layer.lora_B[name].detach()
            A, B = self._fit(key, A_new, slot, B_new.shape[0])
            with torch.no_grad():
                A[slot].zero_(), B[slot].zero_()
                A[slot, :, :spec.r].copy_(A_new.T)
                B[slot, :spec.r].copy_((B_new * spec.scaling).T)
            self.covered[key] = self.covered.get(key, frozenset()) | {name}

    def remove(self, name: str) -> None:
        """Free the adapter's slot (zeroed, so a stale index can never add its update)."""
        slot = self.slots.pop(name)
        for key, (A, B) in self.stacks.items():
            if name in self.covered.get(key, ()):
                A[slot].zero_(), B[slot].zero_()
                self.covered[key] = self.covered[key] - {name}

    def holds(self, layer: LoraLayer, names: tuple[str, ...]) -> bool:
        covered = self.covered.get(id(layer), frozenset())
        return all(n in covered for n in names)

    def _fit(self, key: int, A_new: Tensor, slot: int, fan_out: int) -> tuple[Tensor, Tensor]:
        """This layer's tables, created or grown (slots doubled, rank padded) so `slot` and A_new's rank fit."""
        r, fan_in = A_new.shape
        old = self.stacks.get(key)
        if old is None:
            slots, r_max = slot + 1, r
        else:
            have, r_have = old[0].shape[0], old[0].shape[2]
            if slot < have and r <= r_have:
                return old
            grown = 2 * have if self.capacity is None else min(2 * have, self.capacity + 1)
            slots, r_max = (have if slot < have else max(slot + 1, grown)), max(r, r_have)
        A = A_new.new_zeros(slots, fan_in, r_max)
        B = A_new.new_zeros(slots, r_max, fan_out)
        if old is not None:
            n, r_old = old[0].shape[0], old[0].shape[2]
            A[:n, :, :r_old], B[:n, :r_old] = old
        self.stacks[key] = (A, B)
        return self.stacks[key]


class BankedRoutePlan(RoutePlan):
    """A RoutePlan whose rows read their adapters from an `AdapterBank`: index tensors built once per batch
    (per set of adapters a layer has, and per layer shape), no weights copied for decode rows."""

    def __init__(self, names_per_row: Sequence[str | None], bank: AdapterBank, device: torch.device) -> None:
        super().__init__(names_per_row, "gather")
        self.bank = bank
        self._routed: dict[tuple, tuple[Tensor | None, Tensor]] = {}
        self._slots_per_row: dict[tuple, Tensor] = {}
        self._bags: dict[tuple, tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor | None]] = {}

    def wants_gather(self, layer: LoraLayer, names: tuple[str, ...]) -> bool:
        return self.bank.holds(layer, names)

    def add_terms(self, layer: LoraLayer, names: tuple[str, ...], x: Tensor, out: Tensor) -> Tensor:
        """out + the term of every row whose adapter is in `names` (all held by the bank for this layer)."""
        A, B = self.bank.stacks[id(layer)]
        dtype = inplace_autograd.compute_dtype(x, A)
        x3 = x.reshape(self.rows, -1, x.shape[-1])
        tokens = x3.shape[1]
        if tokens <= BAG_TOKENS and dtype == A.dtype and dtype in BAG_DTYPES:
            a_bags, b_bags, routed = self.bags(names, tokens, A)
            y = bag_lora(x3.reshape(-1, x3.shape[-1]).to(dtype), A, B, a_bags, b_bags, routed)
            return _add_rows(out, None, y.view(self.rows, tokens, -1), self.rows)
        rows, slots = self.routed_rows(names, x.device)
        if _accumulates_in_place(out, x, A) and (rows is None or 2 * len(rows) >= self.rows):
            out3 = out.reshape(self.rows, -1, out.shape[-1])
            gathered_lora_into(out3, x3, A, B, self.slot_per_row(names, x.device))
            return out3.view(out.shape)
        if rows is not None:
            x3 = x3.index_select(0, rows)
        return _add_rows(out, rows, gathered_lora(x3, A, B, slots, dtype), self.rows)

    def slot_per_row(self, names: tuple[str, ...], device: torch.device) -> Tensor:
        """Every row's slot, the empty slot 0 (exact zeros) for rows whose adapter is not in `names`."""
        key = (names, device)
        if key not in self._slots_per_row:
            slots = [self.bank.slots[n] if n in names else 0 for n in self.names]
            self._slots_per_row[key] = torch.tensor(slots, device=device)
        return self._slots_per_row[key]

    def routed_rows(self, names: tuple[str, ...], device: torch.device) -> tuple[Tensor | None, Tensor]:
        """(the rows whose adapter is in `names`, None when that is every row; their slots)."""
        key = (names, device)
        if key not in self._routed:
            chosen = [i for i, n in enumerate(self.names) if n in names]
            slots = torch.tensor([self.bank.slots[self.names[i]] for i in chosen], device=device)
            rows = None if len(chosen) == self.rows else torch.tensor(chosen, device=device)
            self._routed[key] = (rows, slots)
        return self._routed[key]

    def bags(self, names: tuple[str, ...], tokens: int, A: Tensor
             ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor | None]:
        """embedding_bag's indices and offsets for A and B, one bag per token of the batch (empty for the
        tokens of rows whose adapter is not in `names`), and those routed tokens (None: all of them)."""
        _, fan_in, rank = A.shape
        key = (names, tokens, fan_in, rank, A.device)
        if key not in self._bags:
            slots = [self.bank.slots[n] if n in names else -1 for n in self.names]
            token_slots = torch.tensor(slots, device=A.device).repeat_interleave(tokens)
            present = token_slots >= 0
            routed = None if bool(present.all()) else present.nonzero().view(-1)
            self._bags[key] = (bag_index(token_slots, fan_in), bag_index(token_slots, rank), routed)
        return self._bags[key]


def _accumulates_in_place(out: Tensor, x: Tensor, table: Tensor) -> bool:
    """Whether the terms can be added straight into `out` by the matmul (no autograd, one dtype, a plain
    layout): that skips the separate term tensor and its scatter into the routed rows."""
    return not torch.is_grad_enabled() and out.dtype == x.dtype == table.dtype and out.is_contiguous()


def _add_rows(out: Tensor, rows: Tensor | None, y: Tensor, batch: int) -> Tensor:
    """out (batch, ..., features) with y (routed rows, tokens, features) added to the routed rows (all rows
    when `rows` is None); in place unless autograd records."""
    out3 = out.reshape(batch, -1, out.shape[-1])
    y = y.to(out.dtype)
    if torch.is_grad_enabled() and (out.requires_grad or y.requires_grad):
        return (out3 + y if rows is None else out3.index_add(0, rows, y)).view(out.shape)
    if not out3.is_contiguous():  # an expanded batch-1 output
        out3 = out3.contiguous()
    if rows is None:
        out3.add_(y)
    else:
        out3.index_add_(0, rows, y)
    return out3.view(out.shape)
