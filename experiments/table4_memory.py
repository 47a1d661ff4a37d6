"""Table 4 of docs/experiments.md, memory: full fine-tuning, LoRA r=8 q,v and QLoRA r=8 on every linear
layer, each trained a few steps on batches of exactly 64 and 256 tokens, its peak RSS next to lorakit's
estimate of the same job (weights + gradients + optimizer + activations, then evaluation and runtime).

    python experiments/table4_memory.py           # resumable: finished (configuration, seed) runs are skipped

Memory does not depend on the learning rate, so these runs use the middle of each method's sweep grid.
"""

from __future__ import annotations

import json

import study

SEQ_LENS = (64, 128)  # tokens in every row of a training batch (and of the 64 evaluation prompts); at 256
# full fine-tuning would need about 13.5 GiB (lorakit estimate), more than a shared 2-core runner should give
TABLE1_SEQ_LEN = 64  # what `lorakit train --dry-run` sizes the embedded default data at (Table 1's estimate)
STEPS = 3  # peak RSS settles once AdamW's state exists (the first step) and the heap has seen a few batches
EVAL_ROWS = 64  # one evaluation batch, as the estimate assumes
CONFIGS = [c for c in study.METHODS if c.name in ("full", "lora-qv-r8", "qlora-all-r8")]


def estimate_request(config: study.Config, seq_len: int) -> dict | None:
    """What lorakit's estimator is asked for a configuration; None where it has no model of it (DoRA)."""
    settings = config.settings
    if settings.get("full_finetune"):
        return {"config": config.name, "method": "full", "seq_len": seq_len}
    if settings.get("use_dora"):
        return None
    method = "qlora" if settings.get("quantize") else "lora"
    return {"config": config.name, "method": method, "r": settings["r"], "target": settings["target"],
            "seq_len": seq_len}


def estimates(s: study.Study, wanted: list[tuple[study.Config, int]]) -> None:
    """lorakit's estimate of each (configuration, tokens) it models, one small process and JSON file each."""
    for config, seq_len in wanted:
        request = estimate_request(config, seq_len)
        if request is None:
            continue
        spec = {"kind": "estimate", "study": s.describe(), "model": s.model, "batch_size": s.batch_size,
                "precision": s.precision, "request": request}
        print(f"memory estimate {config.name} at {seq_len} tokens", flush=True)
        study.run_child(spec, s.results / "estimates" / f"{config.name}-len{seq_len}.json")


def synthetic_data(s: study.Study, seq_len: int) -> tuple[str, str]:
    """Rows longer than `seq_len` tokens, which the job truncates to exactly `seq_len` (the prompt's start goes,
    the answer stays): every batch then has the shape the estimate sizes."""
    folder = s.runs / "memory-data"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": "Review:" + " fine" * (2 * seq_len) + "\nSentiment:",
             "completion": (" positive", " negative")[i % 2]} for i in range(max(EVAL_ROWS, s.batch_size * STEPS))]
    paths = []
    for name, part in (("train", rows), ("eval", rows[:EVAL_ROWS])):
        path = folder / f"{name}-{seq_len}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        paths.append(study.here(path))
    return paths[0], paths[1]


def probe(s: study.Study, config: study.Config, seq_len: int, seed: int) -> dict:
    train_file, eval_file = synthetic_data(s, seq_len)
    grid = study.LR_GRIDS[config.family]
    name = f"{config.name}-len{seq_len}"
    job = {"model": s.model, "data": train_file, "eval_data": eval_file,
           "out": study.here(s.runs / "memory" / name / f"seed-{seed}"), "steps": STEPS,
           "batch_size": s.batch_size, "lr": grid[len(grid) // 2], "seed": seed, "precision": s.precision,
           "max_length": seq_len, "eval_before": False, "overwrite": True, **config.settings}
    spec = {"kind": "train", "study": s.describe(), "config": name, "seed": seed, "job": job, "memory": True}
    print(f"memory {name} seed {seed}", flush=True)
    return study.run_child(spec, s.results / "memory" / name / f"seed-{seed}.json")


def main(argv: list[str] | None = None) -> None:
    args = study.parser(__doc__).parse_args(argv)
    s = study.study_from(args)
    configs = study.selected(CONFIGS, args.only)
    estimates(s, [(c, n) for c in configs for n in SEQ_LENS])
    for seed in s.seeds:
        for config in configs:
            for seq_len in SEQ_LENS:
                probe(s, config, seq_len, seed)


if __name__ == "__main__":
    main()
