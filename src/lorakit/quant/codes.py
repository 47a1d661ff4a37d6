"""Code tables (NF4, FP4, the signed dynamic 8-bit map) and the lookup tables that make rounding to them fast.

Every value here is computed with the same float32 operations bitsandbytes uses, so codes and
statistics produced from them are byte-identical to bitsandbytes' CPU output (on CUDA the 8-bit pass
rounds as its CUDA kernel does: blockwise.search_dynamic_codes).
"""

from __future__ import annotations

import functools

import torch

QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256

# NF4: quantiles of N(0, 1) with equal probability mass per bin, normalised to [-1, 1] (QLoRA).
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, divided by its max (12) below.
_FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]

# 4-bit rounding grid: s in [-1, 1] falls in cell trunc(CELLS_PER_UNIT * (s + 1)); each cell holds at most
# one rounding boundary, so one comparison against it finishes the exact nearest-code search.
CELLS_PER_UNIT = 2048
_CELL_MARGIN = 1 / 64  # in cells; float32 error of the cell index is below 1e-3 cells
# 8-bit rounding as bitsandbytes' CPU kernel does it: a 65536-entry table over [-1, 1].
LUT8_SIZE = 65536


@functools.cache
def _table_cpu(quant_type: str) -> torch.Tensor:
    values = _NF4 if quant_type == "nf4" else _FP4
    table = torch.tensor(values, dtype=torch.float32)
    return table.div_(table.abs().max())


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 values a 4-bit code stands for (bitsandbytes' `quant_map`); a fresh copy each call."""
    return _table_cpu(quant_type).to(device, copy=True)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # Signed dynamic type: for exponent e = 0..6, 2**e fractions (bin centres of linspace(0.1, 1))
    # scaled by 10**(e - 6), both signs; plus 0 and 1; sorted. 254 + 2 = 256 entries.
    values: list[float] = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (e - 6)) * centres).tolist()
        values += (-(10 ** (e - 6)) * centres).tolist()
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`) for nested absmax; a fresh copy."""
    return _dynamic_map_cpu().to(device, copy=True)


@functools.cache
def _rounding_tables_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = _table_cpu(quant_type)
    order = torch.sort(table, stable=True).indices
    sorted_values = table[order]
    bounds = (sorted_values[:-1] + sorted_values[1:]) / 2  # float32, exactly bitsandbytes' midpoints
    ncells = 2 * CELLS_PER_UNIT + 1  # index 2 * CELLS_PER_UNIT catches s == 1 (and 1 + 1 ulp)
    cells = torch.arange(ncells, dtype=torch.float64)
    low = (cells - _CELL_MARGIN) / CELLS_PER_UNIT - 1
    high = (cells + 1 + _CELL_MARGIN) / CELLS_PER_UNIT - 1
    b = bounds.double()
    below = (b[None, :] < low[:, None]).sum(1)
    inside = (b[None, :] >= low[:, None]) & (b[None, :] <= high[:, None])
    assert int(inside.sum(1).max()) <= 1, "rounding grid too coarse for this code table"
    threshold = torch.full((ncells,), float("inf"), dtype=torch.float32)
    has = inside.any(1)
    threshold[has] = bounds[inside.float().argmax(1)[has]]
    # codes[2 * cell + (s > threshold)] is the packed code: sorted position mapped back to bit pattern.
    positions = torch.stack([below, (below + 1).clamp(max=15)], 1).reshape(-1)
    codes = order[positions].to(torch.uint8)
    return threshold, codes


@functools.cache
def rounding_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold per cell float32, code per (cell, above-threshold) uint8) for exact nearest rounding."""
    threshold, codes = _rounding_tables_cpu(quant_type)
    return threshold.to(device), codes.to(device)


@functools.cache
def _lut8_cpu() -> torch.Tensor:
    code = _dynamic_map_cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT8_SIZE, dtype=torch.float32)) / (LUT8_SIZE - 1)
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


@functools.cache
def lut8(device: torch.device) -> torch.Tensor:
    """Dynamic-map code for each of 65536 evenly spaced points of [-1, 1], as bitsandbytes' CPU kernel builds it."""
    return _lut8_cpu().to(device)


def pair_table(quant_map: torch.Tensor) -> torch.Tensor:
    """For each byte, its two decoded float32 values (high nibble first) stored as one int64.

    One gather of 8-byte words decodes two codes at once; int64 keeps the copy bit-exact. For a plain CPU
    tensor the table is cached by the map's values: building it took a tenth of a small weight's
    dequantize. Subclasses (the fake tensors of memory estimates among them) have no values to read.
    Read only.
    """
    if quant_map.device.type == "cpu" and type(quant_map) is torch.Tensor:
        return _cached_pair_table(tuple(quant_map.to(torch.float32).tolist()))
    return _build_pair_table(quant_map)


@functools.lru_cache(maxsize=64)
def _cached_pair_table(values: tuple[float, ...]) -> torch.Tensor:
    return _build_pair_table(torch.tensor(values, dtype=torch.float32))


def _build_pair_table(quant_map: torch.Tensor) -> torch.Tensor:
    quant_map = quant_map.to(torch.float32)
    high = quant_map.repeat_interleave(16)  # byte b -> quant_map[b >> 4]
    low = quant_map.repeat(16)  # byte b -> quant_map[b & 15]
    return torch.stack([high, low], 1).view(torch.int64).reshape(256)
