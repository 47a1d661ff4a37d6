"""The 4-bit decode as one generated kernel: torch.compile (Inductor: C++/OpenMP on CPU, Triton on CUDA) of the
plain PyTorch definition below, with blockwise.py's eager kernels as the fallback.

The eager decode is several passes (a gather of byte pairs, a scale, a cast to bfloat16); the hope was
that Inductor would fuse them into one pass that writes the output once. The kernel is compiled on the
first call for each (device, output dtype, block size), with the number of blocks marked dynamic so
weight shapes share it (an output that is a view of a longer buffer compiles once more), and cached by
torch for the rest of the process (Inductor also caches it on disk, so later processes mostly skip the
C++ compile). Its results are bit-identical to the eager kernels: one float32 multiply per value, then
the same round-to-nearest cast.

Opt-in for now: `set_enabled(True)` or the environment variable LORAKIT_COMPILE_DEQUANTIZE=1. On the
loaded 2-core host it was measured on (docs/benchmarks.md, issue 16 part 2) the generated kernel was
2.5-3.5x slower than the eager one (Inductor gathers the 16-entry table through a scalar loop and
materialises the nibbles in a first kernel), so it stays off until a quiet run shows it ahead.
When compiling is impossible (no C++ compiler, a Python torch.compile does not support, any compile
error) the first failure is reported once as a RuntimeWarning and the eager kernels serve the rest of
the process.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable

import torch

from ..errors import LorakitError

ENV = "LORAKIT_COMPILE_DEQUANTIZE"
# Below this many values the eager decode takes microseconds, less than checking a compiled kernel's guards,
# and a compile would never pay for itself.
MIN_ELEMENTS = 1 << 16
DEVICE_TYPES = ("cpu", "cuda")  # where Inductor generates code (C++/OpenMP, Triton); elsewhere eager


def _enabled_from_env() -> bool:
    value = os.environ.get(ENV, "0").strip()
    if value not in ("0", "1"):
        raise LorakitError(f"{ENV}={value!r} is not understood; set it to 1 (compiled dequantize) or 0 (eager "
                           "kernels only, the default)")
    return value == "1"


_enabled = _enabled_from_env()
_failure: str | None = None
_compile_seconds: dict[str, float] = {}
_lock = threading.Lock()
_kernel: Callable[..., None] | None = None


def set_enabled(enabled: bool) -> None:
    """Switch the compiled decode on or off for this process (the environment variable sets the start value,
    off by default)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    """Whether dequantize tries the compiled kernel (False also after a compile failed)."""
    return _enabled and _failure is None


def failure() -> str | None:
    """Why compiling failed in this process, or None."""
    return _failure


def compile_seconds() -> dict[str, float]:
    """Wall seconds of the first call of each compiled kernel ('cpu bfloat16 blocksize 64': 8.1), this process."""
    return dict(_compile_seconds)


def _decode(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, out: torch.Tensor) -> None:
    """out[b, 2j] = quant_map[high nibble of packed[b, j]] * absmax[b], out[b, 2j + 1] the low nibble's.

    The same arithmetic as the eager kernels (a float32 product, then the cast to out's dtype), so the
    results are the same bits.
    """
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).flatten(1).long()
    out.copy_(quant_map[codes] * absmax[:, None])


def _compiled_kernel() -> Callable[..., None]:
    global _kernel
    if _kernel is None:
        _kernel = torch.compile(_decode, fullgraph=True)
    return _kernel


def decode_blocks(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, out: torch.Tensor) -> bool:
    """Fill out (nblocks, blocksize) from packed (nblocks, blocksize // 2) uint8 codes and float32 absmax (nblocks,);
    False (out untouched) where the caller's eager kernel should do it: switched off, too small, another device
    (meta, mps, ...), failed before, or inside someone else's torch.compile trace (which then traces the eager
    code)."""
    global _failure
    if not enabled() or out.numel() < MIN_ELEMENTS or out.device.type not in DEVICE_TYPES \
            or torch.compiler.is_compiling():
        return False
    key = f"{out.device.type} {str(out.dtype).removeprefix('torch.')} blocksize {out.shape[1]}"
    for tensor in (packed, absmax, out):
        torch._dynamo.maybe_mark_dynamic(tensor, 0)  # one kernel for every number of blocks
    first = key not in _compile_seconds
    start = time.perf_counter()
    # Fixed grad and autocast state: they are part of a compiled kernel's guards, and the decode needs neither.
    with torch.no_grad(), torch.autocast(out.device.type, enabled=False):
        if not first:
            _compiled_kernel()(packed, absmax, quant_map.float(), out)
            return True
        with _lock:
            try:
                _compiled_kernel()(packed, absmax, quant_map.float(), out)
            except Exception as err:  # noqa: BLE001 - any compile failure means: use the eager kernels
                lines = str(err).strip().splitlines()
                _failure = f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
                warnings.warn(f"lorakit: the compiled 4-bit dequantize is unavailable here ({_failure}); the eager "
                              f"kernels are used instead (same results). Unset {ENV} to skip the attempt.",
                              RuntimeWarning, stacklevel=3)
                return False
    _compile_seconds[key] = time.perf_counter() - start
    return True
