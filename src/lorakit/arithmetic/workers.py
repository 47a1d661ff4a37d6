"""Per-layer arithmetic side by side on worker threads, with a bound on the dense memory in flight.

Each layer's dense work (build ΔW, trim / elect / mean, Gram, eigen decomposition, QR, small SVD) is
independent of the others. On a CPU, torch runs one LAPACK call or one selection per matrix on a single core
however many threads it has (a batched eigh loops over the batch; measured: a batch of two costs two calls),
and at a few hundred columns an eigen decomposition gains nothing from a second thread (TIES on the embedded
default at two threads used one core: CPU time = wall time). So the cores are used by running whole layers concurrently, each with single-threaded torch ops:
`torch.get_num_threads()` workers (the caller's own thread budget), with torch set to one thread while they
run and restored afterwards (a process-wide setting, for the duration of the call).

Jobs come from an iterator consumed on the calling thread, in order, so anything that must happen in model
order (DARE's seeded draws) happens there. A job starts only while the jobs in flight hold less than
WORK_BUDGET_BYTES (one job always may run), so a large model's layers never all become dense at once.

Jobs take their large temporaries from `scratch`: buffers each worker reuses from one layer to the next, since
touching fresh pages can cost more than the element-wise arithmetic on them (with two workers, each allocating
from its own heap, TIES on 28 layers of the embedded default's shapes touched 161k fresh pages without them and
77k with them). A worker drops its buffers after a job
when they exceed its share of the budget, and all of them go when run_jobs returns.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

WORK_BUDGET_BYTES = 1 << 30  # dense float64 work of the jobs in flight (estimated by each job)
_worker = threading.local()  # .buffers: slot -> tensor, while this thread runs jobs


@dataclass(frozen=True)
class LayerJob:
    """One layer's work: `run()` computes its result; `nbytes` estimates the memory it needs meanwhile."""

    run: Callable[[], Any]
    nbytes: int


def run_jobs(jobs: Iterable[LayerJob], workers: int | None = None, budget: int | None = None) -> list[Any]:
    """Every job's result, in the order of `jobs`; the first error raised by a job is raised here."""
    workers = torch.get_num_threads() if workers is None else workers
    budget = WORK_BUDGET_BYTES if budget is None else budget
    if workers <= 1:
        try:
            return [_run_with_scratch(job, budget) for job in jobs]
        finally:
            _worker.__dict__.pop("buffers", None)
    previous = torch.get_num_threads()
    _set_threads(1)
    try:
        return _run_pooled(jobs, workers, budget)
    finally:
        _set_threads(previous)


def _run_pooled(jobs: Iterable[LayerJob], workers: int, budget: int) -> list[Any]:
    results: dict[int, Any] = {}
    running: dict[Future, tuple[int, LayerJob]] = {}

    def collect(block: bool) -> None:
        done, _ = wait(running, return_when=FIRST_COMPLETED, timeout=None if block else 0)
        for future in done:
            index, _ = running.pop(future)
            results[index] = future.result()

    with ThreadPoolExecutor(workers, thread_name_prefix="lorakit-arithmetic") as pool:
        try:
            count = 0
            for index, job in enumerate(jobs):
                collect(block=False)
                while running and (len(running) >= workers or _bytes(running) + job.nbytes > budget):
                    collect(block=True)
                running[pool.submit(_run_with_scratch, job, budget // workers)] = (index, job)
                count = index + 1
            while running:
                collect(block=True)
        except BaseException:
            for future in running:
                future.cancel()
            raise
    return [results[i] for i in range(count)]


def _bytes(running: dict[Future, tuple[int, LayerJob]]) -> int:
    return sum(job.nbytes for _, job in running.values())


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor for `slot`, reused by this worker from job to job (inside run_jobs; elsewhere a
    new one). One slot per live temporary: a job must not hold two results of the same slot, nor return one."""
    buffers = getattr(_worker, "buffers", None)
    if buffers is None:
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    held = buffers.get(slot)
    if held is None or held.numel() < numel or held.dtype != dtype or held.device != device:
        buffers.pop(slot, None)  # freed before its replacement is allocated
        held = buffers[slot] = torch.empty(numel, dtype=dtype, device=device)
    return held[:numel].view(shape)


def _run_with_scratch(job: LayerJob, keep_bytes: int) -> Any:
    """`job.run()` with this thread's scratch buffers, dropped afterwards if they hold more than `keep_bytes`."""
    buffers = _worker.__dict__.setdefault("buffers", {})
    try:
        return job.run()
    finally:
        if sum(b.numel() * b.element_size() for b in buffers.values()) > keep_bytes:
            buffers.clear()


def _set_threads(count: int) -> None:
    """torch's intra-op threads (OpenMP and MKL); builds on the native thread pool warn and keep theirs, and
    there concurrent calls share one pool, so nothing is oversubscribed either way."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.set_num_threads(count)
