"""Batches: padding rows into tensors (one helper for either side), and a batch order that is a pure function
of (n_examples, batch_size, seed, epoch), cut into equal shards for distributed processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lorakit.errors import LorakitError

IGNORE_INDEX = -100  # label of a position without loss, as torch's cross_entropy and transformers expect
PADDING_SIDES = ("right", "left")


def pad_rows(rows: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """Rows of token ids (or labels) in one (n, longest) LongTensor, filled with `value` on `side`."""
    if side not in PADDING_SIDES:
        raise LorakitError(f"padding_side must be 'right' or 'left', got {side!r}.")
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        out[i, where] = torch.as_tensor(row, dtype=torch.long)
    return out


def attention_mask(rows: Sequence[Sequence[int]], side: str = "right") -> torch.Tensor:
    return pad_rows([[1] * len(row) for row in rows], 0, side)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts padded on the left, so each one's last token is the last column."""
    return pad_rows(rows, pad_id, "left").to(device), attention_mask(rows, "left").to(device)


def collate(
    examples: Sequence[Mapping[str, Any]], pad_id: int | None, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad examples into input_ids, attention_mask and labels tensors.

    Causal-LM labels are IGNORE_INDEX on padding; classification labels are a LongTensor of class ids.
    """
    if not examples:
        raise LorakitError("collate got no examples; a batch needs at least one.")
    if pad_id is None:
        raise LorakitError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token.")
    classification = "label" in examples[0]
    if any(("label" in example) != classification for example in examples):
        raise LorakitError("collate got classification and causal-LM examples in one batch; keep them apart.")
    ids = [example["input_ids"] for example in examples]
    batch = {"input_ids": pad_rows(ids, pad_id, padding_side), "attention_mask": attention_mask(ids, padding_side)}
    if classification:
        batch["labels"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)
    else:
        batch["labels"] = pad_rows([example["labels"] for example in examples], IGNORE_INDEX, padding_side)
    return batch


def batch_order(n_examples: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> list[list[int]]:
    """Example indices of every batch of one epoch, shuffled by (seed, epoch).

    NumPy's legacy RandomState is used because its stream is frozen (NEP 19): the same order on every
    platform and version, so a resumed run can recompute an epoch and skip the batches it has done.
    """
    check_int("n_examples", n_examples, 0)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0, 2**32 - 1)
    check_int("epoch", epoch, 0, 2**32 - 1)
    order = np.random.RandomState([seed, epoch]).permutation(n_examples).tolist()
    stop = n_examples - n_examples % batch_size if drop_last else n_examples
    return [order[start : start + batch_size] for start in range(0, stop, batch_size)]


def shard(batches: Sequence[Sequence[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's part of every global batch: the rank-th of world_size contiguous slices.

    Parts differ in size by at most one, and every rank gets at least one example per batch (a rank with
    an empty batch would stall the others in distributed training).
    """
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0, world_size - 1)
    parts = []
    for k, batch in enumerate(batches):
        if len(batch) < world_size:
            raise LorakitError(
                f"batch {k} has {len(batch)} examples, fewer than world_size={world_size}; use a batch size "
                "that is a multiple of world_size, or batch_order(..., drop_last=True)."
            )
        parts.append(list(batch[len(batch) * rank // world_size : len(batch) * (rank + 1) // world_size]))
    return parts


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise LorakitError(f"{name} must be an integer {bounds}, got {value!r}.")
