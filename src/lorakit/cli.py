"""The `lorakit` command: thin commands over the library, tables for people and --json for scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import LorakitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA and QLoRA fine-tuning: train, inspect, merge and quantize adapters.")
console = Console()
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def _dtype(name: Optional[str]):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise LorakitError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return getattr(torch, DTYPES[name])


@app.command()
def inspect(folder: Path = typer.Argument(..., help="adapter folder (lorakit or PEFT)"),
            as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Config, adapted modules, ranks, sizes and per-layer update norms of an adapter folder."""
    from .inspect import describe_adapter, rank_summary

    report = describe_adapter(folder)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
        return
    config = report.config
    summary = Table.grid(padding=(0, 2))
    for key, value in [
        ("folder", report.folder),
        ("base model", report.base_model),
        ("task", config.get("task_type") or "-"),
        ("ranks", rank_summary(report)),
        ("lora_alpha", config.get("lora_alpha")),
        ("rsLoRA / DoRA", f"{bool(config.get('use_rslora'))} / {bool(config.get('use_dora'))}"),
        ("target_modules", config.get("target_modules")),
        ("modules_to_save", config.get("modules_to_save") or "-"),
        ("parameters", f"{report.parameters:,}"),
        ("file size", f"{report.file_bytes / 2**20:.2f} MiB"),
        ("dtype", ", ".join(report.dtypes)),
    ]:
        summary.add_row(f"[bold]{key}[/bold]", str(value))
    console.print(summary)
    layers = Table(title="adapted layers: the base they expect is (in -> out) per module")
    for column in ("module", "rank", "in -> out", "scaling", "||scaling·B·A||"):
        layers.add_column(column, justify="left" if column == "module" else "right")
    for layer in report.layers:
        layers.add_row(layer.module, str(layer.rank), f"{layer.in_features} -> {layer.out_features}",
                       f"{layer.scaling:g}", f"{layer.delta_norm:.4g}")
    console.print(layers)


@app.command()
def merge(model: str = typer.Option("default", help="base model: 'default', a Hugging Face folder or a .gguf"),
          adapter: Path = typer.Option(..., help="adapter folder to fold into the weights"),
          out: Path = typer.Option(..., help="output folder: a plain Hugging Face model"),
          dtype: Optional[str] = typer.Option(None, help="weights dtype of the output: fp32, bf16 or fp16")) -> None:
    """Fold an adapter into its base and write a Hugging Face folder that needs no lorakit to load."""
    from . import io
    from .adapters import unload
    from .models import load_base_model, save_hf_folder

    with console.status("loading base model and adapter"):
        base, tokenizer = load_base_model(model)
        io.load(base, adapter)
        merged = unload(base, merge=True)
    save_hf_folder(merged, tokenizer, out, dtype=_dtype(dtype))
    console.print(f"merged {adapter} into {model}: wrote {out}")


@app.command()
def quantize(model: str = typer.Option("default", help="base model: 'default', a Hugging Face folder or a .gguf"),
             out: Path = typer.Option(..., help="output folder (bitsandbytes 4-bit serialization)"),
             quant_type: str = typer.Option("nf4", "--type", help="nf4 or fp4"),
             blocksize: int = typer.Option(64, help="elements per absmax block"),
             compute_dtype: str = typer.Option("bf16", help="dtype the 4-bit layers compute in"),
             skip: Optional[str] = typer.Option(None, help="comma list of linear layers to keep dense")) -> None:
    """Store a model's linear layers in 4 bits (QLoRA's base); transformers + bitsandbytes loads the folder."""
    from .models import load_base_model
    from .quant import quantization_report, quantize_model
    from .quant.hf_folder import save_quantized

    with console.status("loading and quantizing"):
        base, tokenizer = load_base_model(model)
        quantize_model(base, quant_type, compute_dtype=_dtype(compute_dtype), blocksize=blocksize,
                       skip=tuple(s for s in (skip or "").split(",") if s) or ("lm_head",))
        save_quantized(base, tokenizer, out)
    console.print(f"{quantization_report(base)}\nwrote {out}")


# ---- training ------------------------------------------------------------------------------------------
DEMO_PRESET = {"steps": 60, "lr": 2e-3, "batch_size": 16}  # tuned for the embedded default (docs/experiments.md)


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Optional[Path] = typer.Option(None, help="YAML or TOML file with any of these settings"),
    model: Optional[str] = typer.Option(None, help="'default' (SmolLM2-135M-Instruct), a HF folder, or a .gguf"),
    data: Optional[str] = typer.Option(None, help="'default' (movie-review sentiment) or a .jsonl/.csv/.parquet"),
    eval_data: Optional[str] = typer.Option(None, help="held-out file (default: a seeded 10% of --data)"),
    task: Optional[str] = typer.Option(None, help="causal-lm or classification (default: from the data)"),
    out: Optional[str] = typer.Option(None, help="run folder: adapter/, metrics.jsonl, curves.png, checkpoints/"),
    steps: Optional[int] = typer.Option(None, help="optimizer steps (default: --epochs over the data)"),
    epochs: Optional[float] = typer.Option(None, help="passes over the data when --steps is not given"),
    batch_size: Optional[int] = typer.Option(None, help="examples per optimizer step, over all processes"),
    grad_accum: Optional[int] = typer.Option(None, help="micro-batches accumulated per step"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (warmup then cosine)"),
    lora_plus_ratio: Optional[float] = typer.Option(None, help="LoRA+: B's learning rate / A's"),
    r: Optional[int] = typer.Option(None, help="LoRA rank"),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha (scaling = alpha / r)"),
    dropout: Optional[float] = typer.Option(None, help="dropout on the adapter input"),
    target: Optional[str] = typer.Option(None, help="modules to adapt: comma list, a regex, or all-linear"),
    init: Optional[str] = typer.Option(None, help="adapter start: kaiming, gaussian, pissa or pissa_niter_<k>"),
    use_dora: Optional[bool] = typer.Option(None, "--dora/--no-dora", help="DoRA: learn a magnitude per output"),
    use_rslora: Optional[bool] = typer.Option(None, "--rslora/--no-rslora", help="rsLoRA: scale alpha / sqrt(r)"),
    quantize: Optional[str] = typer.Option(None, help="QLoRA: keep the base in nf4 or fp4"),
    seed: Optional[int] = typer.Option(None, help="seed for data order and initialization"),
    max_length: Optional[int] = typer.Option(None, help="longest tokenized example (longer rows are truncated)"),
    eval_every: Optional[int] = typer.Option(None, help="evaluate every N steps (0: before and after only)"),
    save_every: Optional[int] = typer.Option(None, help="checkpoint every N steps for --resume"),
    precision: Optional[str] = typer.Option(None, help="auto, fp32, bf16 or fp16"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, help="recompute activations to save memory"),
    resume: bool = typer.Option(False, help="continue from the last checkpoint in --out"),
    dry_run: bool = typer.Option(False, help="print the memory estimate and stop"),
    nproc: int = typer.Option(1, help="processes on this machine (runs torchrun for you)"),
) -> None:
    """Fine-tune with LoRA; with no arguments, the embedded default model on the default data."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "resume", "dry_run", "nproc") and v is not None}
    from .train.config_file import job_config

    cfg = job_config(DEMO_PRESET, config, flags | {"resume": resume})
    if nproc > 1:
        _relaunch_with_torchrun(nproc)
        return
    if dry_run:
        _print_estimate(cfg)
        return
    from .train.job import run_job
    from .train.summary import print_summary

    report = run_job(cfg, log=lambda message: console.print(f"[dim]{message}[/dim]"))
    from .train import distributed

    if distributed.is_main():
        print_summary(console, cfg, report)
    distributed.teardown()


@app.command()
def estimate(
    model: str = typer.Option("default", help="model to size up"),
    r: int = typer.Option(8, help="LoRA rank"),
    target: Optional[str] = typer.Option(None, help="modules to adapt (default: the architecture's)"),
    batch_size: int = typer.Option(16, help="examples per step"),
    seq_len: int = typer.Option(64, help="tokens in the longest batch"),
) -> None:
    """Memory needed to train: weights, gradients, optimizer state, activations (LoRA, QLoRA, full)."""
    from .train.config_file import parse_targets
    from .train.estimate import estimate_table

    targets = parse_targets(target) if target else None
    console.print(estimate_table(model, r=r, target=targets, batch_size=batch_size, seq_len=seq_len))


@app.command(name="eval")
def evaluate(
    model: str = typer.Option("default", help="base model: 'default', a Hugging Face folder or a .gguf"),
    adapter: Optional[Path] = typer.Option(None, help="adapter folder (none: the base model alone)"),
    data: str = typer.Option("default", help="'default' or a data file (its held-out 10% unless --eval-data)"),
    eval_data: Optional[str] = typer.Option(None, help="evaluate on this whole file"),
    eval_size: Optional[int] = typer.Option(None, help="only the first N held-out rows"),
    merged: bool = typer.Option(False, help="merge the adapter into the weights first"),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16"),
) -> None:
    """Held-out accuracy (or loss) of a base model, or of a base with an adapter, merged or not."""
    from .train.job import JobConfig, evaluate_job

    cfg = JobConfig(model=model, data=data, eval_data=eval_data, eval_size=eval_size, precision=precision)
    metrics = evaluate_job(cfg, adapter=str(adapter) if adapter else None, merged=merged)
    table = Table(title=f"lorakit eval: {model}" + (f" + {adapter}" + (" (merged)" if merged else "") if adapter else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    console.print(table)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="text to continue"),
    model: str = typer.Option("default", help="base model: 'default', a Hugging Face folder or a .gguf"),
    adapter: Optional[Path] = typer.Option(None, help="adapter folder (none: the base model alone)"),
    merged: bool = typer.Option(False, help="merge the adapter into the weights first"),
    chat: bool = typer.Option(False, help="wrap the prompt as a user message with the chat template"),
    max_new_tokens: int = typer.Option(32, help="tokens to generate"),
) -> None:
    """Greedy continuation of a prompt by a base model, optionally with an adapter (merged or not)."""
    import torch

    from . import io
    from .adapters import merge as merge_adapter
    from .models import load_base_model

    base, tokenizer = load_base_model(model)
    if tokenizer is None:
        raise LorakitError(f"{model} has no tokenizer files; generate needs one beside the weights")
    if adapter is not None:
        io.load(base, adapter)
        if merged:
            merge_adapter(base)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True) if chat else prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
    with torch.no_grad():
        output = base.eval().generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, help="YAML or TOML file with any of these settings"),
    model: Optional[str] = typer.Option(None, help="'default' (SmolLM2-135M-Instruct), a HF folder, or a .gguf"),
    adapter: Optional[list[str]] = typer.Option(None, help="NAME=PATH of an adapter folder (repeatable)"),
    adapter_dir: Optional[str] = typer.Option(None, help="folder whose subfolders are adapters, named after them"),
    served_model_name: Optional[str] = typer.Option(None, help="the base model's name in requests"),
    host: Optional[str] = typer.Option(None, help="address to bind (default 127.0.0.1: this machine only)"),
    port: Optional[int] = typer.Option(None, help="TCP port (default 8000)"),
    max_batch: Optional[int] = typer.Option(None, help="rows decoded together (default 16)"),
    max_adapters: Optional[int] = typer.Option(None, help="adapters held in memory; more load on use (default 8)"),
    max_queue: Optional[int] = typer.Option(None, help="waiting requests before answering 503 (default 256)"),
    quantize: Optional[str] = typer.Option(None, help="keep the base in nf4 (or fp4)"),
    dtype: Optional[str] = typer.Option(None, help="fp32 (default) or bf16"),
    api_key: Optional[str] = typer.Option(None, help="require 'Authorization: Bearer KEY' on every endpoint"),
) -> None:
    """OpenAI-compatible server: the base model and every adapter, batched together (continuous batching)."""
    flags = {k: v for k, v in locals().items() if k != "config" and v not in (None, [])}
    from .serve.server import run, serve_options

    run(serve_options(config, flags), log=lambda message: console.print(f"[dim]{message}[/dim]"))


def _print_estimate(cfg) -> None:
    from .train.estimate import estimate_table

    console.print(estimate_table(cfg.model, r=cfg.r, target=cfg.target, batch_size=cfg.batch_size,
                                 seq_len=min(cfg.max_length, 64 if cfg.data == "default" else cfg.max_length)))


def _relaunch_with_torchrun(nproc: int) -> None:
    """`lorakit train --nproc N ...` is `torchrun --nproc_per_node N -m lorakit train ...`."""
    import subprocess

    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--nproc":
            del args[i:i + 2]
            break
        if arg.startswith("--nproc="):
            del args[i]
            break
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "lorakit", *args]
    raise SystemExit(subprocess.call(command))


def main() -> None:
    """Entry point: lorakit errors become one clear line and exit status 2, not a traceback."""
    try:
        app()
    except LorakitError as exc:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
