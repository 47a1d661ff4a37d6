"""4-bit NF4 (blocksize 64, double quantization) on CPU, 2 threads: lorakit vs bitsandbytes in one process.

Times quantize and dequantize of a 4096x4096 weight (float32 and bfloat16), dequantize of the weight shapes of
small models (--model-shapes: SmolLM2-135M's 576 and 1536, bench_qlora's 768 and 2048), and a 4-bit linear layer
(4096 -> 4096, input 8 x 128 x 4096, computing in --dtype: by default bfloat16 where the CPU has it natively,
float32 where bfloat16 would be emulated): inference forward (eval, no_grad), training
forward (input requires grad) and forward + backward. Each row alternates the libraries call by call
so both see the same machine load; it prints median milliseconds after warm-up and the ratio
lorakit / bitsandbytes (below 1: lorakit is faster), plus whether the results agree. lorakit's
dequantize runs its default (eager) kernels and, in the "compiled" rows, alternated in the same loop,
the opt-in kernel torch.compile generates (quant/compiled.py; the header gives its compile seconds). lorakit puts large dequantized outputs
on transparent huge pages; --no-huge-pages shows the decode without that.
Run: python bench/bench_quant.py [--no-huge-pages] [--dtype bfloat16|float32]   (about 1-2 minutes with a native
compute dtype; emulated bfloat16 takes more than half an hour)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import torch
from harness import add_dtype_argument, compute_dtype, machine, table
from torch import nn

from lorakit.quant import Linear4bit, compiled, pages, quantize


def _medians(fns, warmup: int, repeats: int) -> list[float]:
    """Median milliseconds of each function, called in turn so all see the same machine load."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def _paired_medians(ours, theirs, warmup: int, repeats: int) -> tuple[float, float]:
    return tuple(_medians([ours, theirs], warmup, repeats))


def _compiled(fn):
    """fn with the opt-in compiled dequantize switched on while it runs."""
    def run():
        compiled.set_enabled(True)
        try:
            return fn()
        finally:
            compiled.set_enabled(False)
    return run


def _same(a: torch.Tensor, b: torch.Tensor) -> str:
    if torch.equal(a, b):
        return "identical"
    return f"max |diff| {(a.float() - b.float()).abs().max().item():.2g}"


def tensor_rows(args) -> list[list[str]]:
    rows = []
    torch.manual_seed(0)
    w32 = torch.randn(args.size, args.size) * 0.02
    for dtype in (torch.float32, torch.bfloat16):
        w = w32.to(dtype)
        name = str(dtype).removeprefix("torch.")

        def ours():
            return quantize(w, "nf4", 64, double_quant=True)

        def theirs():
            return BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

        qt, (packed, state) = ours(), theirs()
        same = "identical" if torch.equal(qt.packed, packed.view(-1)) and torch.equal(qt.absmax, state.absmax) \
            else "DIFFERENT"
        rows.append([f"quantize {name}", *_paired_medians(ours, theirs, args.warmup, args.repeats), same])
        theirs_ref = BF.dequantize_4bit(packed, state)
        same, same_compiled = _same(qt.dequantize(), theirs_ref), _same(_compiled(qt.dequantize)(), theirs_ref)
        theirs_dequantize = lambda: BF.dequantize_4bit(packed, state)  # noqa: E731
        eager, fast, bnb_ms = _medians([qt.dequantize, _compiled(qt.dequantize), theirs_dequantize], args.warmup,
                                       args.repeats)
        rows.append([f"dequantize -> {name}", eager, bnb_ms, same])
        rows.append([f"dequantize -> {name}, compiled", fast, bnb_ms, same_compiled])
    return rows


def model_shape_rows(args) -> list[list[str]]:
    """Eager dequantize of the weight shapes of small models, where per-call overhead weighs more than at 4096."""
    rows = []
    for shape in args.model_shapes:
        out_features, in_features = map(int, shape.split("x"))
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            w = (torch.randn(out_features, in_features) * 0.02).to(dtype)
            qt = quantize(w, "nf4", 64, double_quant=True)
            packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            ours, theirs = _paired_medians(qt.dequantize, lambda: BF.dequantize_4bit(packed, state), args.warmup,
                                           max(args.repeats, 50))
            rows.append([f"dequantize {shape} -> {str(dtype).removeprefix('torch.')}", ours, theirs,
                         _same(qt.dequantize(), BF.dequantize_4bit(packed, state))])
    return rows


def linear_rows(args) -> list[list[str]]:
    torch.manual_seed(0)
    linear = nn.Linear(args.size, args.size, bias=False)
    dtype = compute_dtype(args.dtype)
    ours = Linear4bit.from_linear(linear, "nf4", dtype, 64, double_quant=True)

    def bnb_layer():
        layer = bnb.nn.Linear4bit(args.size, args.size, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.load_state_dict(linear.state_dict())
        return layer.to("cpu")

    # Two bitsandbytes layers: its first eval + no_grad forward on CPU repacks the weight for inference,
    # after which that layer no longer passes gradients to its input.
    theirs, theirs_training = bnb_layer(), bnb_layer()
    x = torch.randn(args.batch, args.seq, args.size, dtype=dtype)
    rows = []

    def infer(layer):
        layer.eval()
        with torch.no_grad():
            return layer(x)

    reference = ours.train()(x).detach()  # bitsandbytes' training path computes the same product
    rows.append(["linear forward, eval + no_grad",
                 *_paired_medians(lambda: infer(ours), lambda: infer(theirs), args.warmup, args.repeats),
                 _same(infer(ours), infer(theirs))])
    xg = x.clone().requires_grad_()

    def train_forward(layer):
        layer.train()
        return layer(xg)

    def train_step(layer):
        xg.grad = None
        train_forward(layer).float().square().mean().backward()
        return xg.grad

    rows.append(["linear forward, train (input needs grad)",
                 *_paired_medians(lambda: train_forward(ours), lambda: train_forward(theirs_training),
                                  args.warmup, args.repeats),
                 _same(reference, train_forward(theirs_training).detach())])
    eager, fast, bnb_ms = _medians([lambda: train_step(ours), _compiled(lambda: train_step(ours)),
                                    lambda: train_step(theirs_training)], args.warmup, args.repeats)
    same = _same(train_step(ours).clone(), train_step(theirs_training).clone())
    rows.append(["linear forward + backward, train", eager, bnb_ms, same])
    rows.append(["linear forward + backward, train, compiled", fast, bnb_ms,
                 _same(_compiled(lambda: train_step(ours))().clone(), train_step(theirs_training).clone())])
    return rows


def _huge_pages() -> str:
    """The kernel's transparent huge page mode: lorakit's dequantize asks for them (quant/pages.py)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="weight is size x size")
    parser.add_argument("--model-shapes", nargs="*", default=["576x576", "1536x576", "768x768", "2048x768",
                                                                 "2048x2048"],
                        help="out x in weights whose dequantize is also timed (at least 50 calls each)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="leave lorakit's dequantized outputs on ordinary pages, as bitsandbytes' are")
    add_dtype_argument(parser)
    args = parser.parse_args()
    if args.no_huge_pages:
        pages.MIN_BYTES = sys.maxsize
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = tensor_rows(args) + model_shape_rows(args) + linear_rows(args)
    print(f"# bench/bench_quant.py on {date.today()} ({machine()}, bitsandbytes {bnb.__version__}; "
          f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}; transparent huge pages: {_huge_pages()}"
          f"{', not used' if args.no_huge_pages else ''})")
    print(f"# NF4, blocksize 64, double quantization; weight {args.size}x{args.size}; linear input "
          f"{args.batch}x{args.seq}x{args.size} {compute_dtype(args.dtype)}; median of {args.repeats} after "
          f"{args.warmup} warm-up calls")
    seconds = ", ".join(f"{key}: {s:.1f} s" for key, s in compiled.compile_seconds().items())
    print(f"# compiled dequantize: {'failed, eager used: ' + compiled.failure() if compiled.failure() else seconds} "
          "(first call of each kernel in this process; Inductor's disk cache may have held it from an earlier one)")
    table([[op, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}", same] for op, a, b, same in rows],
          ["operation", "lorakit ms", "bitsandbytes ms", "lorakit / bnb", "results"])


if __name__ == "__main__":
    main()
