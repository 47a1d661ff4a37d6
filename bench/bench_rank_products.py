"""The rank-r products of a LoRA layer in both BLAS layouts, to check layers/rank_products.py on this host.

Each product with a rank-r side is timed as the plain call (C = L·R) and as the transposed one
(Cᵀ = Rᵀ·Lᵀ) round-robin, at GPT-2 small's layer shapes (512 tokens) and the demo's (544 tokens), for
several ranks. It prints the minimum of each and the transposed / plain ratio, and marks the layout that
rank_products.py picks at that rank. Picks whose ratio says otherwise are listed at the end.
Run: python bench/bench_rank_products.py [--ranks 4 8 16 64] [--calls 40] [--threads 2]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from harness import machine, round_robin, table

from lorakit.layers.rank_products import NARROW_RANK

SHAPES = [(512, 768, 2304), (512, 768, 3072), (512, 3072, 768), (544, 576, 576), (544, 576, 192)]


def products(tokens: int, fan_in: int, fan_out: int, rank: int) -> dict[str, tuple[Callable, Callable, bool]]:
    """Per product: (plain call, transposed call, whether rank_products picks the transposed one)."""
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(tokens, fan_in, generator=gen), torch.randn(tokens, fan_out, generator=gen)
    A, B = torch.randn(rank, fan_in, generator=gen), torch.randn(fan_out, rank, generator=gen)
    h, y, grad_x = torch.randn(tokens, rank, generator=gen), torch.randn_like(g), torch.randn_like(x)
    grad_h = torch.randn(rank, tokens, generator=gen).T  # as times_b returns it at narrow ranks
    narrow = rank < NARROW_RANK
    return {
        "g·B": (lambda: g @ B, lambda: (B.T @ g.T).T, narrow),
        "gᵀ·h": (lambda: g.T @ h, lambda: (h.T @ g).T, narrow),
        "grad_hᵀ·x": (lambda: grad_h.T @ x, lambda: (x.T @ grad_h).T, not narrow),
        "y += h·Bᵀ": (lambda: y.addmm_(h, B.T), lambda: y.T.addmm_(B, h.T), True),
        "grad_x += grad_h·A": (lambda: grad_x.addmm_(grad_h, A), lambda: grad_x.T.addmm_(A.T, grad_h.T), False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 64])
    parser.add_argument("--calls", type=int, default=40, help="timed calls of each variant")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# bench/bench_rank_products.py ({machine()}); minima of {args.calls} round-robin calls")
    rows, wrong = [], []
    for rank in args.ranks:
        for tokens, fan_in, fan_out in SHAPES:
            for name, (plain, transposed, picks_transposed) in products(tokens, fan_in, fan_out, rank).items():
                times = round_robin({"plain": plain, "transposed": transposed}, args.calls)
                best = {name: 1e3 * min(seconds) for name, seconds in times.items()}
                ratio = best["transposed"] / best["plain"]
                picked = "transposed" if picks_transposed else "plain"
                rows.append([rank, f"{tokens} x {fan_in} -> {fan_out}", name, f"{best['plain']:.3f}",
                             f"{best['transposed']:.3f}", f"{ratio:.2f}", picked])
                if (ratio > 1.1 and picks_transposed) or (ratio < 0.9 and not picks_transposed):
                    wrong.append(f"r={rank} {fan_in} -> {fan_out} {name}: transposed / plain {ratio:.2f}")
    table(rows, ["rank", "layer", "product", "plain ms", "transposed ms", "transposed / plain", "picked"])
    print("\npicks that this host's timings contradict by more than 10%:" if wrong else
          "\nevery pick agrees with this host's timings (or is within 10%)")
    for line in wrong:
        print(f"  {line}")


if __name__ == "__main__":
    main()
