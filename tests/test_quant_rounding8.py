"""The 8-bit pass of double quantization rounds as bitsandbytes' kernel of the device does.

bitsandbytes' CPU kernel rounds through a 65536-entry table (tested byte-equal in test_quant.py); its CUDA
kernel runs a binary search (`dQuantize` in csrc/kernels.cu). No GPU here, so the search is checked against
a line-by-line scalar transcription of that kernel function; on a GPU, bench/gpu_check.py compares bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.quant import quantize
from lorakit.quant.blockwise import dequantize_8bit, quantize_8bit, search_dynamic_codes
from lorakit.quant.codes import dynamic_map


def _kernel_dquantize(code: np.ndarray, x: np.float32) -> int:
    """dQuantize<0> of bitsandbytes' kernels.cu, scalar, in float32 as the kernel computes it."""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = np.float32(-1.0), np.float32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        return upper_pivot if x > (upper + val) * np.float32(0.5) else pivot
    return lower_pivot if x < (lower + val) * np.float32(0.5) else pivot


def _hard_inputs() -> torch.Tensor:
    """Uniform values, values nearer 0 than the CPU table's spacing, every code, every midpoint (ties), edges."""
    code = dynamic_map()
    gen = torch.Generator().manual_seed(0)
    midpoints = (code[:-1] + code[1:]) * 0.5
    nudged = torch.cat([torch.nextafter(midpoints, torch.tensor(2.0)), torch.nextafter(midpoints, torch.tensor(-2.0))])
    return torch.cat([
        torch.rand(2000, generator=gen) * 2 - 1,
        (torch.rand(1000, generator=gen) * 2 - 1) * 10 ** -torch.randint(2, 7, (1000,), generator=gen).float(),
        code, midpoints, nudged,
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, float("nan")]),
    ])


def test_search_equals_the_cuda_kernel_function():
    x = _hard_inputs()
    code = dynamic_map()
    expected = [_kernel_dquantize(code.numpy(), np.float32(v)) for v in x.tolist()]
    assert search_dynamic_codes(x, code).tolist() == expected


def test_search_is_nearest_and_the_table_is_not_near_zero():
    code = dynamic_map()
    x = (torch.rand(20000, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 1e-3
    search_error = (code[search_dynamic_codes(x, code).long()] - x).abs()
    nearest_error = (code[None] - x[:, None]).abs().min(1).values
    assert torch.equal(search_error, nearest_error)
    table_codes, absmax = quantize_8bit(x, rounding="table")
    search_codes, same_absmax = quantize_8bit(x, rounding="search")
    assert torch.equal(absmax, same_absmax)
    assert (table_codes != search_codes).any()  # the CPU table cannot resolve the codes nearest 0


def test_device_picks_the_rounding_and_unknown_rounding_is_refused():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 1e-3
    assert torch.equal(quantize_8bit(values)[0], quantize_8bit(values, rounding="table")[0])
    with pytest.raises(LorakitError, match="'nearest'"):
        quantize_8bit(values, rounding="nearest")


def test_search_rounding_dequantizes_closer_on_a_weight():
    """On the GPU check's own weight, search codes reconstruct the nested absmax at least as well."""
    w = (torch.randn(512, 1024, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    qt = quantize(w)
    absmax = qt.block_absmax()  # the table-rounded nested statistics, dequantized
    exact = w.float().abs().view(-1, 64).amax(1)
    offset = exact.mean()
    codes, nested = quantize_8bit(exact - offset, rounding="search")
    searched = dequantize_8bit(codes, nested, dynamic_map()) + offset
    assert (searched - exact).abs().max() <= (absmax - exact).abs().max()
