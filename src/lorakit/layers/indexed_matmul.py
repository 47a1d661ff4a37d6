"""Each row's input through its own adapter, read from stacked adapter tables through an index.

The tables hold one slot per adapter, laid out so that a slot's A and B are rows of a 2-D table:
A_table (slots, in, r) viewed as (slots·in, r), row (s, t) = A_s[:, t]; B_table (slots, r, out) viewed as
(slots·r, out), row (s, j) = scaling_s · B_s[:, j]. Then for a row x with slot s

    h = A_s x   = Σ_t x[t] · A_table[s·in + t]
    y = s·B_s h = Σ_j h[j] · B_table[s·r + j]

which is exactly `F.embedding_bag(mode="sum", per_sample_weights=...)`: one bag per token, the token's
values as the bag's weights. The kernel reads each row's weights where they lie (fbgemm on CPU, a CUDA
kernel on GPUs) instead of copying a (rows, r, in) stack first and multiplying it afterwards, which is what
a per-row gather does; the copy costs more than the multiply when every token has its own weights.

With many tokens per row (a prompt) the bags read a row's weights once per token, while a gather copies
them once per row and lets a batched matmul reuse them for every token: `bag_lora` for one token per row,
`gathered_lora` for more (lorakit/layers/adapter_bank.py chooses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# What embedding_bag's sum with per-sample weights takes, on CPU and CUDA; other dtypes are gathered.
BAG_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def bag_index(slots: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Indices and offsets of one bag per entry of `slots`: rows slot·width ... slot·width + width - 1 of a
    table, or an empty bag (a zero result) where the slot is negative."""
    present = slots >= 0
    steps = torch.arange(width, device=slots.device)
    indices = (slots[present, None] * width + steps).reshape(-1)
    lengths = present.long() * width
    return indices, lengths.cumsum(0) - lengths


def bag_lora(x: Tensor, A_table: Tensor, B_table: Tensor, a_bags: tuple[Tensor, Tensor],
             b_bags: tuple[Tensor, Tensor], routed: Tensor | None) -> Tensor:
    """x (tokens, in) -> (tokens, out): each token through the slot its bags name (`bag_index` of the tokens'
    slots, width in for A and r for B); zeros for the tokens outside `routed` (None: every token is routed).
    x has the tables' dtype."""
    slots, fan_in, rank = A_table.shape
    weights = x if routed is None else x.index_select(0, routed)
    h = F.embedding_bag(a_bags[0], A_table.view(slots * fan_in, rank), a_bags[1], mode="sum",
                        per_sample_weights=weights.reshape(-1))
    weights = h if routed is None else h.index_select(0, routed)
    return F.embedding_bag(b_bags[0], B_table.view(slots * rank, -1), b_bags[1], mode="sum",
                           per_sample_weights=weights.reshape(-1))


def gathered_lora(x: Tensor, A_table: Tensor, B_table: Tensor, slots: Tensor, dtype: torch.dtype) -> Tensor:
    """x (rows, tokens, in) -> (rows, tokens, out) in `dtype`: each row's A and B copied out of the tables,
    then two batched matmuls over all its tokens."""
    A_rows = A_table.index_select(0, slots).to(dtype)
    B_rows = B_table.index_select(0, slots).to(dtype)
    return torch.bmm(torch.bmm(x.to(dtype), A_rows), B_rows)


def gathered_lora_into(out: Tensor, x: Tensor, A_table: Tensor, B_table: Tensor, slots: Tensor) -> None:
    """out (rows, tokens, out) += each row's term, x (rows, tokens, in), everything in the tables' dtype: the
    second matmul accumulates into `out` itself. Rows with an empty slot add exact zeros."""
    h = torch.bmm(x, A_table.index_select(0, slots))
    out.baddbmm_(h, B_table.index_select(0, slots))
