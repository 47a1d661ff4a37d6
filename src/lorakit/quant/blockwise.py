"""Blockwise quantization kernels in plain PyTorch: 4-bit codes with packing, and the 8-bit pass for absmax.

Rounding follows bitsandbytes' CPU kernel byte for byte, and its CUDA rounding for the 8-bit pass on CUDA;
steps.py splits the work on CPU.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from ..errors import LorakitError
from . import compiled, pages
from .codes import CELLS_PER_UNIT, LUT8_SIZE, NESTED_BLOCKSIZE, dynamic_map, lut8, pair_table, rounding_tables
from .steps import blocks_per_step, run_steps

DECODE_STEP_BYTES = 1 << 18  # packed bytes per dequantize step on CPU: 2 MiB of float32 values
# Up to this many packed bytes (2M values) one pass of whole-tensor ops decodes 1.1-2x faster than the threaded
# steps, whose per-step work is then too small to pay for its splitting (CPU, 576x576 to 2048x768 weights; at
# 2048x2048 the steps were ahead again).
WHOLE_PASS_BYTES = 1 << 20


def _check_finite(block_max: torch.Tensor, first_block: int, blocksize: int) -> None:
    if not math.isfinite(float(block_max.max())):
        bad = first_block + int((~torch.isfinite(block_max)).nonzero()[0, 0])
        raise LorakitError(
            f"the tensor holds NaN or Inf in block {bad} (elements {bad * blocksize}..{(bad + 1) * blocksize - 1} "
            "of the flattened tensor); 4-bit quantization needs finite values: fix or clamp the weights first"
        )


def _encode(scaled: torch.Tensor, threshold: torch.Tensor, codes: torch.Tensor, out: torch.Tensor) -> None:
    """Round `scaled` (float32, even length) to the nearest code and pack pairs into `out` (uint8, half length).

    bitsandbytes rounds with bucketize against midpoints (ties go down); the cell grid gives the same
    answer with two gathers and one comparison instead of a binary search per element.
    """
    cell = torch.add(scaled, 1.0).mul_(CELLS_PER_UNIT).to(torch.int32)
    above = scaled > torch.index_select(threshold, 0, cell)
    code = torch.index_select(codes, 0, torch.add(above, cell, alpha=2)).view(-1, 2)
    torch.add(code[:, 1], code[:, 0], alpha=16, out=out)  # even element in the high nibble


def quantize_4bit(flat: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes ((n + 1) // 2 uint8) and float32 absmax per block of a flat float tensor."""
    n = flat.numel()
    nfull = n // blocksize
    full = nfull * blocksize
    device = flat.device
    threshold, codes = rounding_tables(quant_type, device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    per = blocks_per_step(nfull, blocksize, device)
    steps = list(zip(
        flat[:full].view(nfull, blocksize).split(per),
        absmax[:nfull].split(per),
        packed[: full // 2].split(per * blocksize // 2),
    )) if nfull else []

    def step(i: int) -> None:
        x, block_max, out = steps[i]
        block_max.copy_(x.abs().amax(1))  # exact in the input dtype
        _check_finite(block_max, i * per, blocksize)
        scaled = x * (1.0 / block_max.clamp(min=1e-38))[:, None]
        _encode(scaled.view(-1), threshold, codes, out)

    run_steps(step, len(steps), device)
    if full < n:
        tail = flat[full:].float()
        # bitsandbytes stores the clamped maximum for the partial block and divides instead of multiplying.
        tail_max = tail.abs().max().clamp(min=1e-38)
        _check_finite(tail_max[None], nfull, blocksize)
        absmax[nfull] = tail_max
        scaled = tail / tail_max
        if (n - full) % 2:
            scaled = torch.cat([scaled, scaled.new_zeros(1)])  # the pad nibble encodes 0.0, as in bitsandbytes
        _encode(scaled, threshold, codes, packed[full // 2 :])
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Flat tensor of `n` values: quant_map[code] * absmax[block], computed in float32, then cast to `dtype`.

    Whole blocks go through the compiled kernel where it is available (compiled.py), else the eager ones: one
    pass over the whole tensor up to WHOLE_PASS_BYTES and off CPU, threaded steps for larger CPU tensors.
    """
    pairs = pair_table(quant_map)
    out = pages.empty(n, dtype, packed.device)
    nfull = n // blocksize
    full = nfull * blocksize
    if nfull:
        codes, target = packed[: full // 2].view(nfull, blocksize // 2), out[:full].view(nfull, blocksize)
        if not compiled.decode_blocks(codes, absmax[:nfull], quant_map, target):
            one_pass = codes.device.type != "cpu" or codes.numel() <= WHOLE_PASS_BYTES
            (_decode_whole if one_pass else _decode_blocks)(codes, absmax[:nfull, None], pairs, target)
    if full < n:
        index = packed[full // 2 :].to(torch.int32)
        values = torch.index_select(pairs, 0, index).view(torch.float32)[: n - full]
        out[full:] = values * absmax[nfull]
    return out


@dataclass(frozen=True)
class _DecodeBuffers:
    """One thread's buffers for a decode step, split once into pieces that elementwise ops run serially on."""

    index: torch.Tensor  # int32 codes of the step's bytes
    index_pieces: tuple[torch.Tensor, ...]
    values: torch.Tensor | None  # float32 products before the cast to a narrower output (None: float32 out)
    value_pieces: tuple[torch.Tensor, ...]

    @classmethod
    def new(cls, rows: int, half: int, piece: int, dtype: torch.dtype, device: torch.device) -> _DecodeBuffers:
        index = torch.empty(rows, half, dtype=torch.int32, device=device)
        values = None if dtype == torch.float32 else torch.empty(rows, 2 * half, dtype=torch.float32, device=device)
        return cls(index, index.split(2 * piece), values, () if values is None else values.split(piece))


def _decode_whole(codes: torch.Tensor, scale: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor) -> None:
    """out[b] = decoded codes[b] * scale[b] for every block row b, as whole-tensor ops on the calling thread."""
    values = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)
    # one 8-byte gather decodes both codes of a byte; int64 keeps the float bits untouched
    torch.index_select(pairs, 0, codes.to(torch.int32).view(-1), out=values.view(torch.int64).view(-1))
    values.mul_(scale)
    if values is not out:
        out.copy_(values)


def _decode_blocks(codes: torch.Tensor, scale: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor) -> None:
    """out[b] = decoded codes[b] * scale[b] for every block row b, in steps of about DECODE_STEP_BYTES codes.

    Decoding is cheap per element, so a step must not be many small ops: on CPU each op hands the GIL
    over, and that cost more than the work. A step is one gather (index_select, serial at any size) and
    torch._foreach_* calls that run the elementwise work in C++ over pieces below ATen's grain size (so
    it stays serial too), into buffers each thread reuses: a few GIL-free calls per step.
    """
    nblocks, half = codes.shape
    device = codes.device
    piece = blocks_per_step(nblocks, 2 * half, device)  # blocks per serial elementwise op on the values
    per = piece * max(1, DECODE_STEP_BYTES // (piece * half))
    reused = threading.local()

    def buffers(rows: int) -> _DecodeBuffers:
        if rows < per:  # the last, shorter step
            return _DecodeBuffers.new(rows, half, piece, out.dtype, device)
        if not hasattr(reused, "buffers"):
            reused.buffers = _DecodeBuffers.new(per, half, piece, out.dtype, device)
        return reused.buffers

    def step(i: int) -> None:
        rows = slice(i * per, (i + 1) * per)
        step_codes, target = codes[rows], out[rows]
        buf = buffers(step_codes.shape[0])
        torch._foreach_copy_(buf.index_pieces, step_codes.split(2 * piece))  # uint8 -> int32 indices
        values, pieces = (target, target.split(piece)) if buf.values is None else (buf.values, buf.value_pieces)
        # one 8-byte gather decodes both codes of a byte; int64 keeps the float bits untouched
        torch.index_select(pairs, 0, buf.index.view(-1), out=values.view(torch.int64).view(-1))
        torch._foreach_mul_(pieces, scale[rows].split(piece))
        if buf.values is not None:
            torch._foreach_copy_(target.split(piece), pieces)

    run_steps(step, -(-nblocks // per), device, min_steps_per_thread=1)  # a step is long: worth a thread


def search_dynamic_codes(scaled: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """Dynamic-map codes (uint8) of `scaled` by bitsandbytes' CUDA rounding (`dQuantize` in kernels.cu).

    A 7-step binary search over the 256 sorted codes from the middle, then a comparison with the midpoint to
    the last code passed on that side (ties go to the search's final code). On finite input it gives the
    nearest code, which the CPU kernel's 65536-entry table misses for values closer to 0 than its spacing
    (0.17% of the nested absmax of a 8192 x 8192 bfloat16 weight); NaN ends at code 0 as in the kernel.
    """
    pivot = torch.full(scaled.shape, 127, dtype=torch.int64, device=scaled.device)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(scaled, -1.0), torch.full_like(scaled, 1.0)
    value = code_map[pivot]
    for stride in (64, 32, 16, 8, 4, 2, 1):
        above = scaled > value
        lower_pivot, lower = torch.where(above, pivot, lower_pivot), torch.where(above, value, lower)
        upper_pivot, upper = torch.where(above, upper_pivot, pivot), torch.where(above, upper, value)
        pivot = pivot + torch.where(above, stride, -stride)
        value = code_map[pivot]
    upper = torch.where(upper_pivot == 255, code_map[255], upper)
    lower = torch.where(lower_pivot == 0, code_map[0], lower)
    above = scaled > value
    code = torch.where(
        above,
        torch.where(scaled > (upper + value) * 0.5, upper_pivot, pivot),
        torch.where(scaled < (lower + value) * 0.5, lower_pivot, pivot),
    )
    return code.to(torch.uint8)


def _table_codes(scaled: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
    """bitsandbytes' CPU rounding: the nearest of 65536 evenly spaced points of [-1, 1] picks the code."""
    # 0 * (1 / 0) and 0 * (1 / subnormal) are NaN: the kernel stores code 0 for them, the code of -1.
    scaled = torch.nan_to_num_(scaled, nan=-1.0).clamp_(-1.0, 1.0)
    position = scaled.add_(1.0).mul_(0.5).mul_(LUT8_SIZE - 1).add_(0.5).to(torch.int32)
    torch.index_select(table, 0, position.view(-1), out=out)


def quantize_8bit(values: torch.Tensor, rounding: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic-map codes (uint8) and float32 absmax per 256 values, as bitsandbytes' quantize_blockwise.

    Both of its kernels normalise by a reciprocal; they round differently, and so does this: `rounding`
    "table" is the CPU kernel's 65536-entry table, "search" the CUDA kernel's binary search. The default
    follows the device, so the bytes equal bitsandbytes' on the device the tensor is on.
    """
    rounding = rounding or ("search" if values.device.type == "cuda" else "table")
    if rounding not in ("table", "search"):
        raise LorakitError(f"unknown 8-bit rounding {rounding!r}; use 'table' (CPU kernel) or 'search' (CUDA)")
    n = values.numel()
    nblocks = -(-n // NESTED_BLOCKSIZE)
    padded = values.new_zeros(nblocks * NESTED_BLOCKSIZE)
    padded[:n] = values
    codes = torch.empty(nblocks * NESTED_BLOCKSIZE, dtype=torch.uint8, device=values.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=values.device)
    lookup = lut8(values.device) if rounding == "table" else dynamic_map(values.device)
    per = blocks_per_step(nblocks, NESTED_BLOCKSIZE, values.device)
    steps = list(zip(padded.view(nblocks, NESTED_BLOCKSIZE).split(per), absmax.split(per),
                     codes.split(per * NESTED_BLOCKSIZE)))

    def step(i: int) -> None:
        x, block_max, out = steps[i]
        torch.amax(x.abs(), 1, out=block_max)
        scaled = x * (1.0 / block_max)[:, None]
        if rounding == "search":
            out.copy_(search_dynamic_codes(scaled.view(-1), lookup))
        else:
            _table_codes(scaled, lookup, out)

    run_steps(step, len(steps), values.device)
    return codes[:n], absmax


def dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """code_map[code] * absmax[block] in float32 (blocks of 256)."""
    n = codes.numel()
    nblocks = -(-n // NESTED_BLOCKSIZE)
    code_map = code_map.to(torch.float32)
    per = blocks_per_step(nblocks, NESTED_BLOCKSIZE, codes.device)
    if nblocks <= per:  # one step: a few whole-tensor ops, no padding (this runs in every small dequantize)
        out = torch.index_select(code_map, 0, codes.to(torch.int32))
        full = n // NESTED_BLOCKSIZE
        out[: full * NESTED_BLOCKSIZE].view(full, NESTED_BLOCKSIZE).mul_(absmax[:full, None])
        if full < nblocks:
            out[full * NESTED_BLOCKSIZE :].mul_(absmax[full])
        return out
    out = torch.empty(nblocks * NESTED_BLOCKSIZE, dtype=torch.float32, device=codes.device)
    padded = codes if n == out.numel() else torch.cat([codes, codes.new_zeros(out.numel() - n)])
    steps = list(zip(padded.split(per * NESTED_BLOCKSIZE), out.view(nblocks, NESTED_BLOCKSIZE).split(per),
                     absmax[:, None].split(per)))

    def step(i: int) -> None:
        index, target, scale = steps[i]
        torch.index_select(code_map, 0, index.to(torch.int32), out=target.view(-1))
        target.mul_(scale)

    run_steps(step, len(steps), codes.device)
    return out[:n]
