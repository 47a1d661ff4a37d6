"""How blockwise kernels split their work on CPU: small steps, shared out over plain threads.

Each step covers fewer than ATen's grain size (32768) elements, so every torch op inside it runs
serially on the calling thread with its temporaries in L2 cache. The steps are shared out over
`torch.get_num_threads()` Python threads instead (torch releases the GIL inside ops). That uses every
core without OpenMP barriers, which cost a whole scheduler timeslice each when another process holds
a core: with one parallel region per op and step, a 4096x4096 quantize ran 70x slower on a busy
2-core machine. On other devices one step covers the whole tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

CPU_STEP = 32767  # most elements per step on CPU
MIN_STEPS_PER_THREAD = 8  # waking a thread costs more than a few steps of work
MAX_THREADS = 8  # beyond this the threads mostly wait for the GIL between ops

_pool: tuple[int, ThreadPoolExecutor] | None = None


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool[0] < threads:
        _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="lorakit-quant"))
    return _pool[1]


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child inherits the pool object but not its threads


os.register_at_fork(after_in_child=_forget_pool)


def blocks_per_step(nblocks: int, blocksize: int, device: torch.device) -> int:
    """How many blocks one step covers on `device`."""
    return max(1, CPU_STEP // blocksize) if device.type == "cpu" else max(1, nblocks)


def run_steps(task: Callable[[int], None], nsteps: int, device: torch.device,
              min_steps_per_thread: int | None = None) -> None:
    """Call task(i) for i in range(nsteps); on CPU, many steps are shared out over torch.get_num_threads() threads,
    each taking at least `min_steps_per_thread` (default MIN_STEPS_PER_THREAD; fewer for long steps)."""
    workers = 1
    if device.type == "cpu":
        least = min_steps_per_thread or MIN_STEPS_PER_THREAD
        workers = max(1, min(torch.get_num_threads(), MAX_THREADS, nsteps // least))
    bounds = [nsteps * w // workers for w in range(workers + 1)]

    def run_part(w: int) -> None:
        for i in range(bounds[w], bounds[w + 1]):
            task(i)

    futures = [_executor(workers - 1).submit(run_part, w) for w in range(1, workers)]
    try:
        run_part(0)
    finally:
        for future in futures:
            future.result()
