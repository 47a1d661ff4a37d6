"""Blockwise quantization kernels in plain PyTorch: 4-bit codes with packing, and the 8-bit pass for absmax.

Rounding follows bitsandbytes' CPU path exactly. On CPU the work runs in chunks of whole blocks so the
temporaries of each step stay in cache; on other devices one chunk covers the whole tensor.
"""

from __future__ import annotations

import torch

from ..errors import LorakitError
from .codes import CELLS_PER_UNIT, LUT8_SIZE, NESTED_BLOCKSIZE, lut8, pair_table, rounding_tables

CPU_CHUNK = 1 << 16  # elements per step on CPU


def _blocks_per_step(device: torch.device, blocksize: int, nblocks: int) -> int:
    if device.type != "cpu":
        return max(nblocks, 1)
    return max(1, CPU_CHUNK // blocksize)


def _check_finite(absmax: torch.Tensor, first_block: int, blocksize: int) -> None:
    if not bool(torch.isfinite(absmax).all()):
        bad = first_block + int((~torch.isfinite(absmax)).nonzero()[0, 0])
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
    rem = n - full
    device = flat.device
    threshold, codes = rounding_tables(quant_type, device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(nfull + (rem > 0), dtype=torch.float32, device=device)
    blocks = flat[:full].view(nfull, blocksize)
    step = _blocks_per_step(device, blocksize, nfull)
    for b0 in range(0, nfull, step):
        b1 = min(b0 + step, nfull)
        x = blocks[b0:b1]
        block_max = absmax[b0:b1]
        block_max.copy_(x.abs().amax(1))
        _check_finite(block_max, b0, blocksize)
        scaled = x * (1.0 / block_max.clamp(min=1e-38))[:, None]
        _encode(scaled.view(-1), threshold, codes, packed[b0 * blocksize // 2 : b1 * blocksize // 2])
    if rem:
        tail = flat[full:].float()
        # bitsandbytes stores the clamped maximum for the partial block and divides instead of multiplying.
        tail_max = tail.abs().max().clamp(min=1e-38)
        _check_finite(tail_max[None], nfull, blocksize)
        absmax[nfull] = tail_max
        scaled = tail / tail_max
        if rem % 2:
            scaled = torch.cat([scaled, scaled.new_zeros(1)])  # the pad nibble encodes 0.0, as in bitsandbytes
        _encode(scaled, threshold, codes, packed[full // 2 :])
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Flat tensor of `n` values: quant_map[code] * absmax[block], computed in float32, then cast to `dtype`."""
    device = packed.device
    pairs = pair_table(quant_map)
    out = torch.empty(n, dtype=dtype, device=device)
    nfull = n // blocksize
    full = nfull * blocksize
    step = _blocks_per_step(device, blocksize, nfull)
    direct = dtype == torch.float32
    scratch = None if direct else torch.empty(min(step, nfull) * blocksize, dtype=torch.float32, device=device)
    for b0 in range(0, nfull, step):
        b1 = min(b0 + step, nfull)
        target = out[b0 * blocksize : b1 * blocksize].view(-1, blocksize)
        values = target if direct else scratch[: (b1 - b0) * blocksize].view(-1, blocksize)
        index = packed[b0 * blocksize // 2 : b1 * blocksize // 2].to(torch.int32)
        torch.index_select(pairs, 0, index, out=values.view(-1).view(torch.int64))
        if direct:
            values.mul_(absmax[b0:b1, None])
        else:
            torch.mul(values, absmax[b0:b1, None], out=target)
    if full < n:
        index = packed[full // 2 :].to(torch.int32)
        values = torch.index_select(pairs, 0, index).view(torch.float32)[: n - full]
        out[full:] = values * absmax[nfull]
    return out


def quantize_8bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic-map codes (uint8) and float32 absmax per 256 values, as bitsandbytes' CPU quantize_blockwise.

    That kernel normalises by a reciprocal and rounds through a 65536-entry table.
    """
    n = values.numel()
    nblocks = -(-n // NESTED_BLOCKSIZE)
    padded = values.new_zeros(nblocks * NESTED_BLOCKSIZE)
    padded[:n] = values
    blocks = padded.view(nblocks, NESTED_BLOCKSIZE)
    absmax = blocks.abs().amax(1)
    scaled = blocks * (1.0 / absmax)[:, None]
    # 0 * (1 / 0) and 0 * (1 / subnormal) are NaN: the kernel stores code 0 for them, the code of -1.
    scaled = torch.nan_to_num_(scaled, nan=-1.0).clamp_(-1.0, 1.0)
    position = scaled.add_(1.0).mul_(0.5).mul_(LUT8_SIZE - 1).add_(0.5).to(torch.int64)
    return lut8(values.device)[position].view(-1)[:n], absmax


def dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """code_map[code] * absmax[block] in float32 (blocks of 256)."""
    n = codes.numel()
    values = code_map.to(torch.float32)[codes.long()]
    nblocks = -(-n // NESTED_BLOCKSIZE)
    padded = values.new_zeros(nblocks * NESTED_BLOCKSIZE)
    padded[:n] = values
    return (padded.view(nblocks, NESTED_BLOCKSIZE) * absmax[:, None]).view(-1)[:n]
