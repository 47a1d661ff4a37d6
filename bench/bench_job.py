"""The main job end to end: `lorakit train` against a plain PEFT + transformers Trainer script on the demo.

Both fine-tune the embedded default (SmolLM2-135M-Instruct) on the movie-review sentences: LoRA r=8,
alpha 16 on q_proj and v_proj, 60 steps x 16, lr 2e-3, 6% warmup then cosine, in the precision the demo's
"auto" picks on this machine (bf16 autocast where the CPU computes bf16 natively, float32 elsewhere, where
emulated bf16 would make both sides many times slower), the same on both sides. Each run is
its own process, the two interleaved over --rounds. The lorakit side calls run_job, exactly what `lorakit
train` runs; the PEFT side is written as PEFT's and transformers' docs show (tokenizer padding on the
right, DataCollatorForSeq2Seq, the Trainer's own loop) and shares nothing with lorakit but the sentences.
Reported per side (median over rounds): training wall seconds (the trainer's own figure: lorakit's
TrainResult.seconds, the Trainer's train_runtime), non-padding tokens per second, peak RSS of the process,
held-out accuracy (which of " positive" / " negative" the model ranks higher after each prompt), and
model-FLOPs utilisation: 4 x non-embedding parameters x tokens/s (forward plus the input-gradient
backward) over the matmul peak measured here in that precision on the model's own shapes. Then the
lorakit / PEFT ratios of each round: rounds are interleaved, so a round's ratio cancels most of the host's
drift, which moves either side's time by 10-20% from one round to the next on a shared VM.
`--sides lorakit lorakit_padded peft_trainer` adds lorakit with packing off (batches padded to their
longest example, as before packing), to show what packing saves within the same interleaved run.
Run: python bench/bench_job.py [--rounds 2]      smoke: --steps 2 --batch-size 4 --eval-size 16 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from harness import compute_dtype, machine, table

TOKENS_FOR_PEAK = 2048  # rows of the matmuls that measure the peak: a demo step's 16 x 40-odd tokens, rounded up
SIDES = ("lorakit", "lorakit_padded", "peft_trainer")


def matmul_peak_tflops(hidden: int, intermediate: int, repeats: int = 5) -> float:
    """Best TFLOP/s of torch.mm in compute_dtype() on the model's shapes (tokens x hidden times hidden x width)."""
    best = 0.0
    dtype = compute_dtype()
    for k, n in ((hidden, hidden), (hidden, intermediate), (intermediate, hidden)):
        a = torch.randn(TOKENS_FOR_PEAK, k, dtype=dtype)
        b = torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * TOKENS_FOR_PEAK * k * n / (time.perf_counter() - start) / 1e12)
    return best


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _non_embedding_parameters(model: torch.nn.Module) -> int:
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    skip = {id(embedding)} | ({id(head.weight)} if head is not None else set())
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in skip)


def run_lorakit(args: argparse.Namespace, packing: bool = True) -> dict:
    """What `lorakit train` runs, with the demo preset and these overrides."""
    from lorakit.cli import DEMO_PRESET
    from lorakit.train.config_file import job_config
    from lorakit.train.job import run_job

    with tempfile.TemporaryDirectory() as out:
        flags = {"steps": args.steps, "batch_size": args.batch_size, "eval_size": args.eval_size, "out": out,
                 "packing": packing}
        cfg = job_config(DEMO_PRESET, None, {k: v for k, v in flags.items() if v is not None})
        report = run_job(cfg, progress=False, log=lambda message: None)
    return {"seconds": report.train.seconds, "tokens": report.train.tokens, "accuracy": report.after["accuracy"],
            "steps": report.train.steps}


def run_peft_trainer(args: argparse.Namespace) -> dict:
    """PEFT + transformers' Trainer, as their docs show; only the sentences come from lorakit."""
    import peft
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, GgufConfig, Trainer,
                              TrainingArguments)

    from lorakit.assets import default_model_path
    from lorakit.train.sentiment import load_splits

    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    non_embedding = _non_embedding_parameters(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    train, test = load_splits(seed=0)

    def encode(prompt: str, answer: str) -> dict:
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + answer_ids)[:256]
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": ([-100] * len(prompt_ids) + answer_ids)[:256]}

    dataset = [encode(e.prompt, e.answer) for e in train]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    seen = {"tokens": 0}

    def counting_collator(rows: list[dict]) -> dict:
        batch = collator(rows)
        seen["tokens"] += int(batch["attention_mask"].sum())
        return batch

    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size or 16,
                                     max_steps=args.steps or 60, learning_rate=2e-3, warmup_steps=0.06,
                                     lr_scheduler_type="cosine", weight_decay=0.0,
                                     bf16=compute_dtype() == torch.bfloat16,
                                     use_cpu=not torch.cuda.is_available(), logging_steps=10, save_strategy="no",
                                     report_to=[], seed=0, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=counting_collator)
        metrics = trainer.train().metrics
    examples = test[: args.eval_size] if args.eval_size else test
    return {"seconds": metrics["train_runtime"], "tokens": seen["tokens"], "steps": trainer.state.global_step,
            "accuracy": _accuracy(model, tokenizer, examples), "non_embedding": non_embedding}


@torch.no_grad()
def _accuracy(model: torch.nn.Module, tokenizer, examples: list) -> float:
    """Share of prompts after which the model ranks the right answer's first token above the other's."""
    model.eval()
    tokenizer.padding_side = "left"  # the last position is each prompt's end
    answers = sorted({e.answer for e in examples} | {" positive", " negative"})
    candidates = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers]
    right, bf16 = 0, compute_dtype() == torch.bfloat16
    for start in range(0, len(examples), 32):
        chunk = examples[start:start + 32]
        batch = tokenizer([e.prompt for e in chunk], return_tensors="pt", padding=True).to(model.device)
        with torch.autocast(model.device.type, torch.bfloat16, enabled=bf16):
            logits = model(**batch).logits[:, -1, candidates]
        right += sum(answers[i] == e.answer for i, e in zip(logits.argmax(-1).tolist(), chunk))
    return right / len(examples)


def _child(side: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, sys.argv[0], "--side", side, *_passthrough(args)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _passthrough(args: argparse.Namespace) -> list[str]:
    options = {"--steps": args.steps, "--batch-size": args.batch_size, "--eval-size": args.eval_size}
    return [str(x) for key, value in options.items() if value is not None for x in (key, value)]


def report(runs: dict[str, list[dict]], peaks: list[float]) -> None:
    peak = statistics.median(peaks)
    non_embedding = runs["peft_trainer"][0]["non_embedding"]  # one base model: counted where it is plain
    medians = {}
    rows = []
    for side, found in runs.items():
        run = sorted(found, key=lambda r: r["seconds"])[(len(found) - 1) // 2]
        tokens_per_s = run["tokens"] / run["seconds"]
        mfu = 4 * non_embedding * tokens_per_s / (peak * 1e12)
        medians[side] = run | {"tokens_per_s": tokens_per_s, "mfu": mfu}
        rows.append([side, ", ".join(f"{r['seconds']:.1f}" for r in found), f"{run['seconds']:.1f}",
                     f"{tokens_per_s:,.0f}", f"{run['peak_rss_mb']:,.0f}", f"{run['accuracy']:.4f}",
                     f"{100 * mfu:.1f}%"])
    print(f"{compute_dtype()} matmul peak on the model's shapes: {peak:.3g} TFLOP/s (runs: "
          f"{', '.join(f'{p:.3g}' for p in peaks)})")
    table(rows, ["side", "training s per round", "median s", "tokens/s", "peak RSS MB", "accuracy", "MFU"])
    ours, theirs = medians["lorakit"], medians["peft_trainer"]
    print(f"lorakit / PEFT + Trainer: time {ours['seconds'] / theirs['seconds']:.2f}x (target <= 0.5x), peak RSS "
          f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x (target <= 0.6x), accuracy "
          f"{ours['accuracy'] - theirs['accuracy']:+.4f}")
    pairs = list(zip(runs["lorakit"], runs["peft_trainer"]))  # rounds are interleaved: one pair per round
    times = ", ".join(f"{a['seconds'] / b['seconds']:.3f}" for a, b in pairs)
    peaks_ratio = ", ".join(f"{a['peak_rss_mb'] / b['peak_rss_mb']:.3f}" for a, b in pairs)
    print(f"per round, lorakit / PEFT + Trainer: time {times}; peak RSS {peaks_ratio}")
    if "lorakit_padded" in medians:
        padded = medians["lorakit_padded"]
        print(f"lorakit packed / padded: time {ours['seconds'] / padded['seconds']:.2f}x, accuracy "
              f"{ours['accuracy'] - padded['accuracy']:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=SIDES, help="(internal) run one side in this process")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's 60)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the demo's 16)")
    parser.add_argument("--eval-size", type=int, default=None, help="held-out sentences (default: all 1,200)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=["lorakit", "peft_trainer"],
                        help="what to run each round (lorakit and peft_trainer are always compared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.side:
        runners = {"lorakit": run_lorakit, "lorakit_padded": lambda a: run_lorakit(a, packing=False),
                   "peft_trainer": run_peft_trainer}
        result = runners[args.side](args)
        print(json.dumps(result | {"peak_rss_mb": _peak_rss_mb()}))
        return
    sides = [side for side in SIDES if side in set(args.sides) | {"lorakit", "peft_trainer"}]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    config = {"hidden": 576, "intermediate": 1536}  # SmolLM2-135M
    peaks = [matmul_peak_tflops(**config)]
    started = time.perf_counter()
    for round_ in range(args.rounds):  # interleaved: a drift in machine speed hits both sides alike
        for side in sides:
            runs[side].append(_child(side, args))
            print(f"  [{round_ + 1}/{args.rounds}] {side}: {runs[side][-1]}", file=sys.stderr, flush=True)
        peaks.append(matmul_peak_tflops(**config))
    print(f"# bench/bench_job.py ({machine()}); {time.perf_counter() - started:.0f} s wall; "
          f"{args.rounds} rounds, steps {args.steps or 60} x {args.batch_size or 16}")
    report(runs, peaks)


if __name__ == "__main__":
    main()
