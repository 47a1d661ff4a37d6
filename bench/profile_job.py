"""Where a training step of the demo job goes, and what packing saves, in one process on this CPU.

Builds the demo job exactly as `lorakit train` does (SmolLM2-135M-Instruct, movie reviews, LoRA r=8 on
q_proj and v_proj, batch 16, precision auto = bf16 autocast where the CPU has it), then:
1. profiles --profile-steps optimizer steps with torch.profiler, for padded and for packed batches, and
   prints each step's time split into op groups by self time (the rest of the wall time is Python and the
   profiler between ops), plus the heaviest single ops;
2. times --pairs steps of each batching alternately on the same global batches (padded, packed, packed
   into rows as wide as the longest example, padded, ...), so a drift in machine speed hits all alike, and
   prints medians, tokens computed and real tokens.
Run: python bench/profile_job.py [--profile-steps 3] [--pairs 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from functools import partial

import torch
from harness import machine, table

GROUPS = [  # (group, pattern on the op name), first match wins
    ("matmuls (mm, addmm, bmm)", r"aten::(mm|addmm_?|bmm|baddbmm|_addmm_activation|mkldnn_\w*)$"),
    ("attention kernel (sdpa, fwd + bwd)", r"scaled_dot_product|flash_attention"),
    ("copies and dtype casts", r"aten::(_to_copy|copy_|to|clone|contiguous|_copy_from\w*)$"),
    ("softmax, log-softmax, cross-entropy", r"softmax|nll_loss|cross_entropy"),
    ("optimizer and grad clipping (_foreach, adamw)", r"_foreach|adamw|_fused"),
    ("gather / index / embedding", r"aten::(embedding\w*|index\w*|gather|scatter\w*|nonzero|masked_select)$"),
    ("elementwise and reductions (norms, rotary, SiLU, residual)",
     r"aten::(mul|add|sub|div|pow|rsqrt|sqrt|mean|sum|neg|cat|silu\w*|sigmoid\w*|exp|where|masked_fill_?|"
     r"fill_|zero_|lerp_?|addcmul_?|addcdiv_?|maximum|clamp\w*|cumsum|ne|eq|lt|gt|ge|le|bitwise_\w+|"
     r"logical_\w+|all|any|min|max|abs|reciprocal|rsub|_reshape_alias|add_|mul_|div_|sub_)$"),
    ("views, reshapes, allocation", r"aten::(view|reshape|_unsafe_view|transpose|t|expand|slice|select|permute|"
     r"as_strided|unsqueeze|squeeze|detach|alias|empty\w*|zeros\w*|ones\w*|full\w*|resize_|split\w*|"
     r"unbind|chunk|narrow|numpy_T|lift_fresh|_local_scalar_dense|item|arange|result_type)$"),
]


LONGEST = "packed, rows as wide as the longest"  # the packing before session 13, for comparison


def group_of(name: str) -> str:
    return next((group for group, pattern in GROUPS if re.search(pattern, name)), "other ops (autograd engine, hooks)")


def build(batch_size: int):
    """The demo job's model and both batchings, as `lorakit train` prepares them."""
    from lorakit.cli import DEMO_PRESET
    from lorakit.train.config_file import job_config
    from lorakit.train.job import prepare
    from lorakit.train.loop import Trainer
    from lorakit.train.packing import train_batching

    out = tempfile.mkdtemp()
    cfg = job_config(DEMO_PRESET, None, {"batch_size": batch_size, "out": out})
    torch.manual_seed(cfg.train.seed)
    model, tokenizer, prepared = prepare(cfg, torch.device("cpu"))
    trainers, losses = {}, {}
    for name, packing in (("padded", False), ("packed", True)):
        collate, losses[name] = train_batching(model, prepared.train, tokenizer.pad_token_id, packing)
        trainers[name] = Trainer(model, prepared.train, collate, losses[name], cfg.train, None, progress=False)
    trainers[LONGEST] = Trainer(model, prepared.train, partial(pack_as_wide_as_longest, pad_id=tokenizer.pad_token_id),
                                losses["packed"], cfg.train, None, progress=False)
    return trainers


def pack_as_wide_as_longest(rows: list, pad_id: int) -> dict:
    """Packing as it was before rows got the width that costs least (session 13): rows as wide as the longest."""
    from lorakit.train.batching import pack

    return pack(rows, pad_id, width=max(len(row["input_ids"]) for row in rows))


def batch_shape(trainer, step: int) -> tuple[int, int]:
    """(tokens the model computes, real tokens) of a step's batch."""
    from lorakit.train.batching import batch_order

    index = batch_order(len(trainer.examples), trainer.settings.batch_size, trainer.settings.seed, 0)[step]
    batch = trainer.collate([trainer.examples[i] for i in index])
    return batch["input_ids"].numel(), int(batch["attention_mask"].sum())


def profile(trainer, steps: range) -> tuple[float, list]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for step in steps:
            trainer._step(step)
        wall = time.perf_counter() - start
    return wall, prof.key_averages()


def print_profile(name: str, wall: float, events: list, n_steps: int) -> None:
    per_step_ms = 1e3 * wall / n_steps
    groups: dict[str, float] = {}
    for event in events:
        groups[group_of(event.key)] = groups.get(group_of(event.key), 0.0) + event.self_cpu_time_total / 1e3
    traced = sum(groups.values())
    rows = [[group, f"{ms / n_steps:,.0f}", f"{100 * ms / (1e3 * wall):.1f}%"]
            for group, ms in sorted(groups.items(), key=lambda kv: -kv[1])]
    rows.append(["Python and profiler between ops (wall - traced)", f"{(1e3 * wall - traced) / n_steps:,.0f}",
                 f"{100 * (1 - traced / (1e3 * wall)):.1f}%"])
    print(f"\n## {name}: {per_step_ms:,.0f} ms per step under the profiler ({n_steps} steps)")
    table(rows, ["op group", "ms per step", "share of step"])
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    table([[e.key, e.count // n_steps, f"{e.self_cpu_time_total / 1e3 / n_steps:,.1f}", group_of(e.key)] for e in top],
          ["op", "calls per step", "self ms per step", "group"])


def print_token_accounting(trainers: dict) -> None:
    """Tokens the model computes per step, padded and packed, over the demo's 60 steps (no timing involved)."""
    rows = []
    for name, trainer in trainers.items():
        shapes = [batch_shape(trainer, step) for step in range(min(60, trainer.per_epoch))]
        computed, real = sum(s[0] for s in shapes), sum(s[1] for s in shapes)
        rows.append([name, f"{computed / len(shapes):,.0f}", f"{real / len(shapes):,.0f}", f"{computed / real:.3f}"])
    print("\n## tokens per step over the first 60 global batches")
    table(rows, ["batching", "tokens computed", "real tokens", "computed / real"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=6, help="alternating timed steps of each batching")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trainers = build(args.batch_size)
    print(f"# bench/profile_job.py ({machine()}); demo job, batch {args.batch_size}")
    print_token_accounting(trainers)
    for trainer in trainers.values():
        trainer.model.train()
        trainer._step(0)  # warm-up: first-call allocations and kernel choices
    first = 1
    for name, trainer in trainers.items():
        steps = range(first, first + args.profile_steps)
        if args.profile_steps:
            wall, events = profile(trainer, steps)
            print_profile(name, wall, events, len(steps))
    start = first + args.profile_steps
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for step in range(start, start + args.pairs):
        for name, trainer in trainers.items():
            began = time.perf_counter()
            trainer._step(step)
            times[name].append(time.perf_counter() - began)
    rows = []
    for name, trainer in trainers.items():
        shapes = [batch_shape(trainer, step) for step in range(start, start + args.pairs)]
        computed, real = sum(s[0] for s in shapes), sum(s[1] for s in shapes)
        rows.append([name, f"{1e3 * statistics.median(times[name]):,.0f}",
                     ", ".join(f"{1e3 * t:,.0f}" for t in times[name]), f"{computed / args.pairs:,.0f}",
                     f"{real / args.pairs:,.0f}", f"{real / sum(times[name]):,.0f}"])
    print(f"\n## alternating steps {start}..{start + args.pairs - 1}, same global batches for both")
    table(rows, ["batching", "median ms", "each step ms", "tokens computed", "real tokens", "real tokens/s"])
    padded, packed, longest = (statistics.median(times[n]) for n in ("padded", "packed", LONGEST))
    print(f"packed / padded step time: {packed / padded:.3f}; packed / packed as wide as the longest: "
          f"{packed / longest:.3f}")


if __name__ == "__main__":
    main()
