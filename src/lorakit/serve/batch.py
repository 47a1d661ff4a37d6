"""The rows a server decodes together: their left-padded KV cache, attention mask and positions, and the
two forwards (prefill of new prompts, one decode step) with each row routed to its own adapter.

Each row's keys and values live in one batch tensor per layer only while the row runs: finished rows are
dropped with `keep` (the padding columns no row needs any more are cut at the same time), new rows are
joined with `join` after their own prefill. Every row sees exactly its own tokens (masked padding, its own
positions), so its logits are those of the model run on that row alone.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from ..layers.adapter_bank import AdapterBank, BankedRoutePlan
from ..state import find_state, lora_layers


class RunningBatch:
    """KV cache (rows, heads, length, dim) per layer, left-padded, with its mask and each row's next position."""

    def __init__(self, cache: DynamicCache, mask: Tensor, positions: Tensor, adapters: list[str | None]) -> None:
        self.cache, self.mask, self.positions, self.adapters = cache, mask, positions, adapters

    @property
    def rows(self) -> int:
        return len(self.adapters)

    @classmethod
    def prefill(cls, model: nn.Module, bank: AdapterBank, prompts: Sequence[Sequence[int]],
                adapters: list[str | None]) -> tuple[RunningBatch, Tensor]:
        """Run the new prompts (left-padded together); returns their batch and last-position logits."""
        device = _device(model)
        length = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), length, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, length - len(prompt):] = torch.tensor(prompt, device=device)
            mask[i, length - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        # The last position by index, not by slice: a gathered copy is contiguous, so the output head is one
        # matrix multiply. A strided slice into a frozen head is a batched one that reads the whole
        # (vocab x hidden) weight once per row, about 6x slower for 32 rows on one thread.
        last = torch.tensor([length - 1], device=device)
        with routed(model, bank, adapters):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, logits_to_keep=last)
        return cls(out.past_key_values, mask, mask.sum(-1), list(adapters)), out.logits[:, -1]

    def decode(self, model: nn.Module, bank: AdapterBank, tokens: Tensor) -> Tensor:
        """Feed each row its last token; returns the next-token logits (rows, vocab)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        with routed(model, bank, self.adapters):
            out = model(input_ids=tokens.view(-1, 1), attention_mask=self.mask,
                        position_ids=self.positions.view(-1, 1), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.positions = self.positions + 1
        return out.logits[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Drop every other row (their cache is freed) and the leading columns no remaining row uses."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        self.adapters = [self.adapters[i] for i in rows]

    def join(self, other: RunningBatch) -> None:
        """Append `other`'s rows, left-padding the shorter cache so both have the same length."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, length, -2), _pad_left(theirs.keys, length, -2)])
            mine.values = torch.cat([_pad_left(mine.values, length, -2), _pad_left(theirs.values, length, -2)])
        self.mask = torch.cat([_pad_left(self.mask, length, -1), _pad_left(other.mask, length, -1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.adapters = self.adapters + other.adapters


@contextlib.contextmanager
def routed(model: nn.Module, bank: AdapterBank, adapters: list[str | None]) -> Iterator[None]:
    """Every adapted layer routes row i through adapters[i], gathering plain adapters from the bank."""
    if find_state(model) is None:  # no adapter loaded at all: every row is the base model
        yield
        return
    layers = [layer for _, layer in lora_layers(model)]
    plan = BankedRoutePlan(adapters, bank, _device(model))
    for layer in layers:
        layer.lora_routes = plan
    try:
        yield
    finally:
        for layer in layers:
            layer.lora_routes = None


def _pad_left(t: Tensor, length: int, dim: int) -> Tensor:
    missing = length - t.shape[dim]
    if not missing:
        return t
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(t, pad)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device
