"""Adapter arithmetic on the embedded default (SmolLM2-135M, fp32): two rank-64 adapters on every linear layer
but the head (210 layers), combined, resized and analyzed by lorakit, beside PEFT's add_weighted_adapter on
the same adapters.

Configurations (each in its own process; the adapters are the same in all: lorakit creates them with
B ~ N(0, 0.01), seeded, and PEFT loads them from lk.save folders):
  lk_cat, lk_linear        lk.combine(weights 1, -0.5), method cat / linear (exact, factored SVD)
  lk_linear_r64            lk.combine linear truncated to rank 64
  lk_ties                  lk.combine ties, density 0.5, rank 64 (dense ΔW, Gram eigen decomposition per layer;
                           layers side by side on --threads worker threads, arithmetic/workers.py)
  lk_dare_ties             lk.combine dare_ties, density 0.5, rank 64 (the same dense path with seeded drops)
  lk_resize                lk.resize one adapter to rank 32
  lk_analyze               lk.analysis.analyze(a, b): spectra, amplification, both φ grids
  peft_cat, peft_linear    add_weighted_adapter(..., "cat" / "linear")
  peft_svd_r64             add_weighted_adapter(..., "svd", svd_rank=64)
  peft_ties_svd_r64        add_weighted_adapter(..., "ties_svd", density=0.5, svd_rank=64)
Each prints wall and CPU seconds of the one call and the relative Frobenius error of the result against the
exact Σ w_i·s_i·B_i·A_i; for lk_ties, against the dense TIES merge truncated to rank 64 by a full
torch.linalg.svd (the path lorakit used before GramSpectrum), on the 7 layers of block 0. CPU seconds approximate
what a quiet machine needs at one thread (--threads, default 1); on a loaded host wall time is several times larger.
lorakit's combine runs its layers on --threads worker threads (arithmetic/workers.py), so with --threads 2 its
wall time can be below its CPU time on an idle machine.
Run: python bench/bench_arithmetic.py [--only 'lk_*']
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from harness import main, table

import lorakit as lk
from lorakit.arithmetic.dense import merge_dense
from lorakit.models import load_base_model
from lorakit.state import lora_layers

WEIGHTS = {"a": 1.0, "b": -0.5}
CONFIGS = ["lk_cat", "lk_linear", "lk_linear_r64", "lk_ties", "lk_dare_ties", "lk_resize", "lk_analyze",
           "peft_cat", "peft_linear", "peft_svd_r64", "peft_ties_svd_r64"]
PEFT_CALLS = {"peft_cat": {"combination_type": "cat"}, "peft_linear": {"combination_type": "linear"},
              "peft_svd_r64": {"combination_type": "svd", "svd_rank": 64},
              "peft_ties_svd_r64": {"combination_type": "ties_svd", "density": 0.5, "svd_rank": 64}}


def lorakit_model() -> torch.nn.Module:
    model, _ = load_base_model("default")
    lk.inject(model, lk.LoraConfig(r=64, alpha=16, target_modules="all-linear"), "a")
    lk.add_adapter(model, "b", lk.LoraConfig(r=64, alpha=32, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in WEIGHTS:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=generator) * 0.01)
    return model


def exact(layer) -> torch.Tensor:
    return sum(w * layer.lora_delta(a, torch.float64) for a, w in WEIGHTS.items())


def ties_by_full_svd(layer, rank: int = 64, density: float = 0.5) -> torch.Tensor:
    """The reference for lk_ties: the dense TIES merge, truncated by a full SVD."""
    merged = merge_dense(torch.stack([w * layer.lora_delta(a, torch.float64) for a, w in WEIGHTS.items()]), "ties",
                         density)
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    return U[:, :rank] * S[:rank] @ Vh[:rank]


def relative_error(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    num = sum(float((got - want).norm() ** 2) for got, want in pairs)
    den = sum(float(want.norm() ** 2) for _, want in pairs)
    return (num / den) ** 0.5


def timed(call) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def run_config(name: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = lorakit_model()
    if name.startswith("lk_"):
        calls = {
            "lk_cat": lambda: lk.combine(model, WEIGHTS, method="cat", name="c"),
            "lk_linear": lambda: lk.combine(model, WEIGHTS, method="linear", name="c"),
            "lk_linear_r64": lambda: lk.combine(model, WEIGHTS, method="linear", name="c", rank=64),
            "lk_ties": lambda: lk.combine(model, WEIGHTS, method="ties", name="c", rank=64, density=0.5),
            "lk_dare_ties": lambda: lk.combine(model, WEIGHTS, method="dare_ties", name="c", rank=64, density=0.5),
            "lk_resize": lambda: lk.resize(model, "a", rank=32),
            "lk_analyze": lambda: lk.analysis.analyze(model, "a", "b"),
        }
        wall, cpu, _ = timed(calls[name])
        error = None
        if name in ("lk_cat", "lk_linear", "lk_linear_r64"):
            error = relative_error([(layer.lora_delta("c", torch.float64), exact(layer)) for _, layer in lora_layers(model)])
        if name == "lk_ties":
            block0 = list(lora_layers(model))[:7]
            error = relative_error([(layer.lora_delta("c", torch.float64), ties_by_full_svd(layer)) for _, layer in block0])
        return {"seconds": wall, "cpu_seconds": cpu, "error": error}
    import peft

    with tempfile.TemporaryDirectory() as tmp:
        for adapter in WEIGHTS:
            lk.save(model, Path(tmp) / adapter, adapter=adapter)
        wanted = {n: exact(layer) for n, layer in lora_layers(model)}
        base = lk.unload(model, merge=False)
        theirs = peft.PeftModel.from_pretrained(base, str(Path(tmp) / "a"), adapter_name="a")
        theirs.load_adapter(str(Path(tmp) / "b"), adapter_name="b")
    wall, cpu, _ = timed(lambda: theirs.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "c",
                                                              **PEFT_CALLS[name]))
    error = None
    if name != "peft_ties_svd_r64":
        pairs = [(theirs.base_model.model.get_submodule(n).get_delta_weight("c").double(), want)
                 for n, want in wanted.items()]
        error = relative_error(pairs)
    return {"seconds": wall, "cpu_seconds": cpu, "error": error}


def report(results: dict[str, dict]) -> None:
    rows = [[name, f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.1f}", "-" if r["error"] is None else f"{r['error']:.2e}"]
            for name, r in results.items()]
    table(rows, ["configuration", "wall s", "cpu s", "rel. error vs Σ w·ΔW"])
    for ours, theirs in [("lk_cat", "peft_cat"), ("lk_linear", "peft_linear"), ("lk_linear_r64", "peft_svd_r64"),
                         ("lk_ties", "peft_ties_svd_r64")]:
        if ours in results and theirs in results:
            ratio = results[theirs]["cpu_seconds"] / max(results[ours]["cpu_seconds"], 1e-9)
            print(f"{theirs} / {ours}: {ratio:.2f}x cpu time")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: on a loaded "
                        "2-core host, 2 threads spin-wait on each other and small LAPACK calls get many times slower)")


if __name__ == "__main__":
    main(CONFIGS, run_config, report, add_arguments)
