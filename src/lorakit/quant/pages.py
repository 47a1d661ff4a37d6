"""Large dequantized outputs on transparent huge pages (Linux, CPU).

A dequantized weight is a fresh allocation written once, and the first write to each 4 KiB page costs a
page fault. For a 4096 x 4096 output that first touch took longer than the decoding itself on the
machine the benchmarks ran on (a VM). Asking the kernel for 2 MiB pages (madvise MADV_HUGEPAGE, as
PyTorch's own THP_MEM_ALLOC_ENABLE=1 does for every large tensor) and faulting them in with one call
(MADV_POPULATE_WRITE) cut it 3-4x. The output is written in full, so no memory is wasted. Where a call
is unavailable or refused, the pages stay as they were.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from collections.abc import Callable

import torch

MIN_BYTES = 4 << 20  # below this the saving is small and the buffer may sit inside the malloc heap
_HUGE_PAGE = 2 << 20
_MADV_POPULATE_WRITE = 23  # not in Python's mmap module


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None  # not Linux
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def empty(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty(n) whose whole 2 MiB-aligned stretches are backed by huge pages where Linux allows."""
    out = torch.empty(n, dtype=dtype, device=device)
    nbytes = n * out.element_size()
    madvise = _madvise() if device.type == "cpu" and nbytes >= MIN_BYTES else None
    if madvise is not None:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            madvise(start, end - start, mmap.MADV_HUGEPAGE)  # a hint: failure leaves ordinary pages
            # fault them in now, in one call: threads faulting huge pages side by side were slower
            madvise(start, end - start, _MADV_POPULATE_WRITE)  # Linux 5.14+; older kernels refuse, harmlessly
    return out
