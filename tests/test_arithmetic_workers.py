"""Adapter arithmetic run layer by layer on worker threads (lorakit.arithmetic.workers): the pool keeps order,
its memory bound and the caller's thread setting; combine / extract give the same result whatever the worker
count and budget (one layer at a time up to all at once), on mixed layer shapes and layers that only some
inputs adapt; the in-place trim selects exactly what a stable sort selects."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

import lorakit as lk
from lorakit.arithmetic import workers
from lorakit.arithmetic.dense import trim_
from lorakit.arithmetic.workers import LayerJob, run_jobs
from lorakit.state import lora_layers
from test_arithmetic import WEIGHTS, TwoLinears, reference_merge, result_delta, three_adapters
from tiny_models import _llama, randomize_adapters


@pytest.fixture
def threads():
    """Set torch's thread count (= the number of workers) for one test, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# ---- the pool ------------------------------------------------------------------------------------------------
class Recorder:
    """Jobs that note how many jobs and bytes are in flight while they run."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: list[int] = []
        self.seen: list[tuple[int, int]] = []  # (jobs, bytes) in flight at each start

    def job(self, index: int, nbytes: int, barrier: threading.Barrier | None = None, hold: float = 0.0) -> LayerJob:
        def run() -> tuple[int, int]:
            with self.lock:
                self.running.append(nbytes)
                self.seen.append((len(self.running), sum(self.running)))
            if barrier is not None:
                barrier.wait()  # returns only once `barrier.parties` jobs run at the same time
            time.sleep(hold)  # long enough for the pool to start any job it would (wrongly) let overlap
            threads_inside = torch.get_num_threads()
            with self.lock:
                self.running.remove(nbytes)
            return index, threads_inside

        return LayerJob(run, nbytes)


def test_pool_runs_jobs_side_by_side_in_order_with_one_torch_thread_each(threads):
    threads(2)
    recorder = Recorder()
    barrier = threading.Barrier(3, timeout=30)
    results = run_jobs((recorder.job(i, 10, barrier) for i in range(6)), workers=3, budget=100)
    assert [index for index, _ in results] == list(range(6))
    assert {inside for _, inside in results} == {1}
    assert max(jobs for jobs, _ in recorder.seen) == 3
    assert torch.get_num_threads() == 2


def test_pool_keeps_the_bytes_in_flight_within_the_budget(threads):
    threads(2)
    recorder = Recorder()
    sizes = [40, 40, 70, 30, 30, 30, 250, 10]  # 250: over the budget alone, so it runs by itself
    results = run_jobs((recorder.job(i, n, hold=0.05) for i, n in enumerate(sizes)), workers=4, budget=100)
    assert [index for index, _ in results] == list(range(len(sizes)))
    for jobs, nbytes in recorder.seen:
        assert jobs <= 4
        assert nbytes <= 100 or jobs == 1
    assert max(jobs for jobs, _ in recorder.seen) >= 2  # the small ones did share the budget


def test_pool_raises_a_job_error_and_restores_the_thread_count(threads):
    threads(2)

    def fail():
        raise ValueError("bad layer")

    jobs = [LayerJob(lambda: 1, 1), LayerJob(fail, 1), LayerJob(lambda: 3, 1)]
    with pytest.raises(ValueError, match="bad layer"):
        run_jobs(iter(jobs), workers=2, budget=10)
    assert torch.get_num_threads() == 2


def test_one_worker_runs_inline():
    caller = threading.get_ident()
    assert run_jobs([LayerJob(threading.get_ident, 1)], workers=1) == [caller]


# ---- combine and extract: every worker count and budget gives the same adapter ----------------------------------
SETTINGS = [(1, None), (2, 1), (2, None), (3, 30_000)]  # (workers, budget in bytes): 1 = one layer at a time


def _combined(method: str, workers_: int, budget: int | None, threads, monkeypatch) -> dict[str, torch.Tensor]:
    threads(workers_)
    if budget is not None:
        monkeypatch.setattr(workers, "WORK_BUDGET_BYTES", budget)
    torch.manual_seed(0)
    model = three_adapters(_llama(), "all-linear")  # 7 shapes of layer; c adapts only the first half of them
    kwargs = {"rank": 3} if method == "linear" else {"rank": 5, "density": 0.4, "seed": 3}
    report = lk.combine(model, WEIGHTS, method=method, name="m", **kwargs)
    adapted = [n for n, layer in lora_layers(model) if "m" in layer.lora_adapters]
    assert [layer.module for layer in report.layers] == adapted
    return result_delta(model, "m")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "magnitude_prune", "linear"])
def test_combine_is_the_same_for_every_worker_count_and_budget(method, threads, monkeypatch):
    want = _combined(method, *SETTINGS[0], threads, monkeypatch)
    assert len({tuple(d.shape) for d in want.values()}) >= 3
    for setting in SETTINGS[1:]:
        got = _combined(method, *setting, threads, monkeypatch)
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-12 * float(want[name].abs().max()))


@pytest.mark.parametrize("workers_", [1, 3])
def test_dare_drops_follow_model_order_with_workers(workers_, threads):
    """The documented draw order (layers in model order, inputs in weights order) holds with a pool whose
    jobs may finish in any order; checked against the loop implementation of the definition."""
    threads(workers_)
    torch.manual_seed(0)
    model = TwoLinears()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["first", "second"]), "a")
    lk.add_adapter(model, "b", lk.LoraConfig(r=1, alpha=2, target_modules=["second"]))
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    weights, density, seed = {"a": 1.0, "b": -0.7}, 0.6, 11
    lk.combine(model, weights, method="dare_ties", name="m", rank=7, density=density, seed=seed)
    got = result_delta(model, "m")
    generator = torch.Generator().manual_seed(seed)
    for name, layer in lora_layers(model):
        tasks, masks = [], []
        for adapter, w in weights.items():
            if adapter in layer.lora_adapters:
                delta = result_delta(model, adapter)[name] * w
                tasks.append(delta.flatten().tolist())
                drawn = torch.rand(delta.shape, generator=generator, dtype=torch.float64)
                masks.append((drawn < density).flatten().tolist())
        merged = reference_merge(tasks, "dare_ties", density, masks)
        want = torch.tensor(merged, dtype=torch.float64).view(got[name].shape)
        torch.testing.assert_close(got[name], want, atol=1e-6 * float(want.abs().max()), rtol=1e-5)


def test_extract_is_the_same_for_every_worker_count_and_budget(threads, monkeypatch):
    torch.manual_seed(0)
    base = _llama().eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "proj" in name:
                param.add_(torch.randn(param.shape) * 0.01)
    results = []
    for workers_, budget in SETTINGS:
        threads(workers_)
        monkeypatch.setattr(workers, "WORK_BUDGET_BYTES", budget or (1 << 30))
        model = copy.deepcopy(base)
        report = lk.extract(model, tuned, energy=0.9)
        results.append(({layer.module: layer.rank_after for layer in report.layers}, result_delta(model, "default")))
    for ranks, deltas in results[1:]:
        assert ranks == results[0][0]
        for name, want in results[0][1].items():
            torch.testing.assert_close(deltas[name], want, rtol=0, atol=1e-12 * float(want.abs().max()))


# ---- the trim's selection ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.1, 0.37, 0.5, 0.9])
def test_trim_selects_what_a_stable_sort_selects(density):
    """Many equal magnitudes (small integers, both signs): the kept entries are the int(density·n) largest,
    ties at the threshold to the first in row-major order, each task on its own."""
    gen = torch.Generator().manual_seed(0)
    tasks = torch.randint(-6, 7, (3, 17, 13), generator=gen).double()
    tasks[1] = torch.randn(17, 13, generator=gen, dtype=torch.float64)  # no ties in this one
    want = torch.zeros_like(tasks)
    keep = int(density * 17 * 13)
    for i, task in enumerate(tasks):
        order = torch.sort(task.abs().flatten(), descending=True, stable=True).indices[:keep]
        want[i].view(-1)[order] = task.flatten()[order]
    got = trim_(tasks.clone(), density)
    assert torch.equal(got, want)


def test_scratch_buffers_are_reused_within_a_run_and_dropped_over_the_limit():
    from lorakit.arithmetic.workers import _worker, scratch

    def take(numel: int) -> LayerJob:
        return LayerJob(lambda: scratch("slot", (numel,), torch.float64, torch.device("cpu")).data_ptr(), 8 * numel)

    def held() -> LayerJob:
        return LayerJob(lambda: "slot" in _worker.buffers, 0)

    small = run_jobs([take(10), take(6), take(10), held()], workers=1, budget=1_000)
    assert small[0] == small[1] == small[2] and small[3]  # one buffer, reused (a smaller request is a view of it)
    large = run_jobs([take(400), held()], workers=1, budget=1_000)  # 3,200 bytes > the budget: not kept
    assert large[1] is False
    assert getattr(_worker, "buffers", None) is None  # nothing held once run_jobs returns
    assert scratch("slot", (4,), torch.float64, torch.device("cpu")).shape == (4,)  # outside: a fresh tensor
