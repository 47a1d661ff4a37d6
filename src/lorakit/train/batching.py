"""Batches: padding rows into tensors (one helper for either side), packing causal-LM examples into shared
rows instead of padding each, and a batch order that is a pure function of (n_examples, batch_size, seed,
epoch), cut into equal shards for distributed processes.
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


# Packed rows are chosen as wide as costs least: wider rows leave less of their tail empty, but every token
# attends over its whole row (SDPA computes the masked blocks too), so a token's work grows with the width.
# On the demo's CPU profile attention was 6.6% of a step at rows of about 60 tokens, so a token in a row of
# width w costs about (1 + w / ATTENTION_WIDTH) of a linear layer's per-token work. The search stays within
# [longest, 2 x longest], in at most WIDTH_CANDIDATES steps, so it costs little next to a step.
ATTENTION_WIDTH = 850
WIDTH_CANDIDATES = 32


def pack(examples: Sequence[Mapping[str, Any]], pad_id: int | None, width: int | None = None) -> dict[str, torch.Tensor]:
    """Causal-LM examples laid end to end in rows of `width` tokens (default: packed_width's choice), so a
    batch of short and long examples costs about its real tokens instead of rows x longest.

    Rows are filled first-fit in order of decreasing length (ties by position, so the layout is a pure function
    of the examples). `position_ids` restart at 0 where each example begins, which is how transformers tells
    the sequences of a row apart and keeps them from attending to each other (train/packing.py checks that a
    model honours it); the free tail of a row is a run of pad tokens with positions of its own, counting from 0
    again after the longest example's length, so no position is beyond those the examples use (a model with
    learned positions, GPT-2, has a table only up to its context length, and rows may be wider). Every
    example's first label is IGNORE_INDEX, as position 0 of a row of its own is never predicted, so no
    target crosses from one example into the next; `attention_mask` is 1 on the examples' tokens only.
    """
    if not examples:
        raise LorakitError("pack got no examples; a batch needs at least one.")
    if pad_id is None:
        raise LorakitError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token.")
    if any("labels" not in example for example in examples):
        raise LorakitError("pack takes causal-LM examples (input_ids and labels); classification rows are padded.")
    lengths = [len(example["input_ids"]) for example in examples]
    longest = max(lengths)
    width = packed_width(lengths) if width is None else width
    if longest > width:
        raise LorakitError(f"pack: an example of {longest} tokens does not fit rows of width {width}.")
    rows = first_fit_decreasing(lengths, width)
    shape = (len(rows), width)
    batch = {"input_ids": torch.full(shape, pad_id, dtype=torch.long),
             "attention_mask": torch.zeros(shape, dtype=torch.long),
             "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
             "position_ids": torch.zeros(shape, dtype=torch.long)}
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            end = start + lengths[i]
            batch["input_ids"][r, start:end] = torch.as_tensor(examples[i]["input_ids"], dtype=torch.long)
            batch["labels"][r, start + 1 : end] = torch.as_tensor(examples[i]["labels"][1:], dtype=torch.long)
            batch["attention_mask"][r, start:end] = 1
            batch["position_ids"][r, start:end] = torch.arange(lengths[i])
            start = end
        batch["position_ids"][r, start:] = torch.arange(width - start) % longest
    return batch


def first_fit_decreasing(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices of the examples in each row: longest first (ties by position), each into the first row with room."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, space in enumerate(free) if space >= lengths[i]), len(rows))
        if row == len(rows):
            rows.append([])
            free.append(width)
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def packed_width(lengths: Sequence[int]) -> int:
    """The row width, from the longest example to twice that, whose first-fit rows cost least (packing_cost);
    the narrowest wins a tie."""
    longest = max(lengths)
    step = max(1, longest // WIDTH_CANDIDATES)
    return min(range(longest, 2 * longest + 1, step), key=lambda width: packing_cost(lengths, width))


def packing_cost(lengths: Sequence[int], width: int) -> float:
    """Work of first-fit rows of `width`, in units of one token's linear layers: tokens computed, attention included."""
    return len(first_fit_decreasing(lengths, width)) * width * (1 + width / ATTENTION_WIDTH)


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
