"""The `lorakit` command: thin commands over the library, tables for people and --json for scripts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import LorakitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA and QLoRA: train, inspect, merge, combine, analyze, export and serve adapters.")
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
    from .adapter_report import describe_adapter, rank_summary

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
          out: Path = typer.Option(..., help="output: a Hugging Face model folder, or a .gguf file"),
          dtype: Optional[str] = typer.Option(None, help="weights dtype of the output: fp32, bf16 or fp16"),
          format: str = typer.Option("hf", "--format", callback=lambda v: _one_of("--format", v, ("hf", "gguf")),
                                     help="hf: a Hugging Face folder; gguf: one llama.cpp file (--out x.gguf, "
                                          "Llama bases loaded from a GGUF, e.g. the default)")) -> None:
    """Fold an adapter into its base and write a Hugging Face folder (or a llama.cpp GGUF) that needs no lorakit."""
    from . import adapter_files as io
    from .adapters import unload
    from .atomic import check_writable_folder
    from .models import load_base_model, save_hf_folder

    inputs = {"--adapter": adapter} | ({} if model == "default" else {"--model": Path(model)})
    _refuse_writing_over(out, inputs)
    check_writable_folder(out.parent if format == "gguf" else out, "--out")  # before minutes of loading
    with console.status("loading base model and adapter"):
        base, tokenizer = load_base_model(model)
        io.load(base, adapter)
        merged = unload(base, merge=True)
    try:
        if format == "gguf":
            from .export import gguf_source, merged_to_gguf

            merged_to_gguf(merged, out, gguf_source(model), dtype=_dtype(dtype) or merged.dtype)
        else:
            save_hf_folder(merged, tokenizer, out, dtype=_dtype(dtype))
    except OSError as exc:
        raise LorakitError(f"could not write the merged model to {out} ({exc.strerror or exc}); free some space or "
                           "choose another --out") from None
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
    full_finetune: Optional[bool] = typer.Option(None, "--full-finetune", help="train every weight instead of an "
                                                 "adapter (with its own default --lr); saves the whole model"),
    quantize: Optional[str] = typer.Option(None, help="QLoRA: keep the base in nf4 or fp4"),
    quantize_embeddings: Optional[str] = typer.Option(None, help="with --quantize: embeddings and head in int8, "
                                                      "nf4 or fp4 too"),
    seed: Optional[int] = typer.Option(None, help="seed for data order and initialization"),
    max_length: Optional[int] = typer.Option(None, help="longest tokenized example (longer rows are truncated)"),
    eval_every: Optional[int] = typer.Option(None, help="evaluate every N steps (0: before and after only)"),
    eval_before: Optional[bool] = typer.Option(None, "--eval-before/--no-eval-before",
                                               help="evaluate the untrained model first (default: yes)"),
    save_every: Optional[int] = typer.Option(None, help="checkpoint every N steps for --resume"),
    precision: Optional[str] = typer.Option(None, help="auto, fp32, bf16 or fp16"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, help="recompute activations to save memory"),
    packing: Optional[bool] = typer.Option(None, help="causal LM: examples share rows instead of padding"),
    resume: Optional[bool] = typer.Option(None, "--resume", help="continue the run in --out from its last checkpoint"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="delete the earlier run in --out first"),
    dry_run: Optional[bool] = typer.Option(None, "--dry-run", help="print the memory estimate and stop"),
    nproc: Optional[int] = typer.Option(None, help="processes on this machine (runs torchrun for you)"),
) -> None:
    """Fine-tune with LoRA (or every weight: --full-finetune); with no arguments, the embedded default model on
    the default data."""
    flags = {k: v for k, v in locals().items() if k != "config" and v is not None}
    from .train import distributed
    from .train.config_file import job_config

    cfg = job_config(DEMO_PRESET, config, flags)  # every setting checked before anything loads
    if cfg.nproc > 1 and not distributed.launched_by_torchrun():
        _relaunch_with_torchrun(cfg.nproc)
        return
    if cfg.dry_run:
        _print_estimate(cfg)
        return
    from .train.job import run_job
    from .train.summary import print_summary

    report = run_job(cfg, log=lambda message: console.print(f"[dim]{message}[/dim]"))
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
    from .train.estimate_table import estimate_table

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

    cfg = JobConfig.of(model=model, data=data, eval_data=eval_data, eval_size=eval_size, precision=precision)
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

    from . import adapter_files as io
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


def _refuse_writing_over(out: Path, inputs: dict[str, Path]) -> None:
    """An output folder must not be, or sit inside, a folder the command reads."""
    target = out.expanduser().resolve()
    for flag, path in inputs.items():
        source = path.expanduser().resolve()
        if target == source or source in target.parents:
            raise LorakitError(f"--out {out} is inside {flag} {path}, which this command reads; writing there would "
                               "overwrite it. Choose another --out")


# ---- adapter arithmetic and analysis ---------------------------------------------------------------
@app.command()
def combine(
    adapters: list[Path] = typer.Argument(..., help="adapter folders to combine (lorakit or PEFT)"),
    weights: Optional[str] = typer.Option(None, help="comma list, one weight per adapter (default: all 1)"),
    method: str = typer.Option("linear", help="cat, linear, ties, dare_linear, dare_ties or magnitude_prune"),
    rank: Optional[int] = typer.Option(None, help="rank of the result (default: exact for cat/linear, Σ r_i else)"),
    density: Optional[float] = typer.Option(None, help="share of entries kept (ties, dare_*, magnitude_prune)"),
    seed: int = typer.Option(0, help="seed of DARE's random drops"),
    dora_as_update: bool = typer.Option(False, "--dora-as-update", help="DoRA inputs count as their effective "
                                        "update W' - W; the result is a plain LoRA adapter of --rank"),
    model: str = typer.Option("default", help="base model: 'default', a Hugging Face folder or a .gguf"),
    out: Path = typer.Option(..., help="folder for the combined adapter (PEFT layout)"),
) -> None:
    """Combine adapters on their true updates Σ w_i·s_i·B_i·A_i (never A and B mixed separately)."""
    from . import adapter_files as io
    from .arithmetic import combine as combine_adapters
    from .models import load_base_model

    values = [float(w) for w in weights.split(",")] if weights else [1.0] * len(adapters)
    if len(values) != len(adapters):
        raise LorakitError(f"--weights has {len(values)} values for {len(adapters)} adapters; give one per adapter")
    with console.status("loading base model and adapters"):
        base, _ = load_base_model(model)
        names = [f"input{i}" for i in range(len(adapters))]
        for name, folder in zip(names, adapters):
            io.load(base, folder, adapter=name)
    with console.status(f"combining ({method})"):
        report = combine_adapters(base, dict(zip(names, values)), method=method, name="combined", rank=rank,
                                  density=density, seed=seed, dora_as_update=dora_as_update)
    io.save(base, out, adapter="combined")
    _print_rank_report(report, " + ".join(f"{w:g}·{a}" for w, a in zip(values, adapters)))
    console.print(f"wrote {out}")


@app.command()
def resize(
    adapter: Path = typer.Argument(..., help="adapter folder (lorakit or PEFT)"),
    rank: Optional[int] = typer.Option(None, help="directions kept per layer"),
    energy: Optional[float] = typer.Option(None, help="share of ||ΔW||_F² kept per layer, e.g. 0.95"),
    model: str = typer.Option("default", help="base model: 'default', a Hugging Face folder or a .gguf"),
    out: Path = typer.Option(..., help="folder for the resized adapter (PEFT layout)"),
) -> None:
    """Cut an adapter to a lower rank by the SVD of each ΔW; reports the energy kept per layer."""
    from . import adapter_files as io
    from .arithmetic import resize as resize_adapter
    from .models import load_base_model

    with console.status("loading base model and adapter"):
        base, _ = load_base_model(model)
        io.load(base, adapter)
    report = resize_adapter(base, "default", rank=rank, energy=energy)
    io.save(base, out)
    _print_rank_report(report, str(adapter))
    console.print(f"wrote {out}")


@app.command()
def extract(
    base: str = typer.Option("default", help="base model: 'default', a Hugging Face folder or a .gguf"),
    tuned: str = typer.Option(..., help="the fine-tuned (or merged) model: a Hugging Face folder or a .gguf"),
    rank: Optional[int] = typer.Option(None, help="directions kept per layer"),
    energy: Optional[float] = typer.Option(None, help="share of ||ΔW||_F² kept per layer, e.g. 0.95"),
    target: str = typer.Option("all-linear", help="layers to extract: all-linear, a comma list or a regex"),
    out: Path = typer.Option(..., help="folder for the extracted adapter (PEFT layout)"),
) -> None:
    """A LoRA adapter from the weight differences tuned - base, by a truncated SVD of each layer's ΔW."""
    from . import adapter_files as io
    from .arithmetic import extract as extract_adapter
    from .models import load_base_model
    from .train.config_file import parse_targets

    with console.status("loading both models"):
        base_model, _ = load_base_model(base)
        tuned_model, _ = load_base_model(tuned)
    with console.status("extracting"):
        report = extract_adapter(base_model, tuned_model, rank=rank, energy=energy, target_modules=parse_targets(target))
    io.save(base_model, out)
    _print_rank_report(report, f"{tuned} - {base}")
    if report.not_captured:
        shown = ", ".join(report.not_captured[:10]) + (f", ... {len(report.not_captured) - 10} more"
                                                       if len(report.not_captured) > 10 else "")
        console.print(f"[bold yellow]not captured by the adapter[/bold yellow] (changed, but not a weight of an "
                      f"extracted layer): {shown}")
    console.print(f"wrote {out}")


@app.command()
def analyze(
    adapter: Path = typer.Argument(..., help="adapter folder (lorakit or PEFT)"),
    other: Optional[Path] = typer.Argument(None, help="second adapter: subspace similarity φ against it"),
    model: str = typer.Option("default", help="base model: 'default', a Hugging Face folder or a .gguf"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write every per-layer figure as JSON"),
    plots: Optional[Path] = typer.Option(None, help="folder for PNG figures (φ heatmaps, singular spectra)"),
) -> None:
    """What an adapter learned (the LoRA paper, section 7): spectrum and effective rank of each ΔW, the
    amplification factor ||ΔW||_F / ||Uᵀ W V||_F, and with OTHER the subspace similarity φ(i, j)."""
    from . import adapter_files as io
    from .analysis import analyze as analyze_adapter
    from .models import load_base_model

    with console.status("loading base model and adapters"):
        base, _ = load_base_model(model)
        io.load(base, adapter, adapter="first")
        if other is not None:
            io.load(base, other, adapter="second")
    with console.status("analyzing"):
        result = analyze_adapter(base, "first", "second" if other is not None else None)
    result.adapter, result.other = _short_path(adapter), _short_path(other) if other is not None else None
    _print_analysis(result)
    if json_file is not None:
        json_file.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        console.print(f"wrote {json_file}")
    if plots is not None:
        from .analysis.figures import plot_similarity, plot_spectra

        written = [plot_spectra(result, plots)]
        if other is not None:
            written += plot_similarity(result, plots, "A") + plot_similarity(result, plots, "delta")
        console.print("wrote " + ", ".join(str(p) for p in written))


def _short_path(path: Path) -> str:
    """The last two parts of a folder ('run/adapter'), enough to tell adapters apart in tables and figures."""
    return "/".join(path.parts[-2:])


def _print_rank_report(report, title: str) -> None:
    table = Table(title=f"{report.method}: {title}")
    for column in ("module", "rank before", "rank after", "||ΔW||_F", "energy kept"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for layer in report.layers:
        table.add_row(layer.module, str(layer.rank_before), str(layer.rank_after), f"{layer.norm:.4g}",
                      f"{layer.kept_energy:.4f}")
    console.print(table)
    console.print(f"{len(report.layers)} layers; energy kept overall {report.kept_energy:.4f}, "
                  f"lowest layer {report.min_kept_energy:.4f}")


def _print_analysis(result) -> None:
    import statistics

    table = Table(title=f"analysis of {result.adapter}" + (f" against {result.other}" if result.other else ""))
    columns = ["module", "rank", "||ΔW||_F", "eff. rank 90%", "99%", "amplification", "||UᵀWV|| ΔW / W top / random"]
    if result.other:
        columns += ["φ_A(1,1)", "φ_A(r,r)", "φ_ΔW(1,1)"]
    for column in columns:
        table.add_column(column, justify="left" if column == "module" else "right")
    for layer in result.layers:
        amp = layer.amplification
        row = [layer.module, str(layer.rank), f"{layer.norm:.4g}", str(layer.effective_rank_90),
               str(layer.effective_rank_99), f"{amp.factor:.3g}",
               f"{amp.on_delta:.3g} / {amp.on_weight:.3g} / {amp.on_random:.3g}"]
        if result.other:
            if layer.similarity_A is None:
                row += ["-", "-", "-"]
            else:
                r = min(layer.similarity_A.shape)
                row += [f"{float(layer.similarity_A[0, 0]):.3f}", f"{float(layer.similarity_A[r - 1, r - 1]):.3f}",
                        f"{float(layer.similarity_delta[0, 0]):.3f}"]
        table.add_row(*row)
    console.print(table)
    factors = [layer.amplification.factor for layer in result.layers]
    console.print(f"{len(result.layers)} layers; median amplification factor {statistics.median(factors):.3g} "
                  f"(the LoRA paper, Table 7: about 21.5 at r=4 and 1.9 at r=64 on GPT-3)")


@app.command(name="export")
def export_adapter(
    adapter: Path = typer.Argument(..., help="adapter folder (lorakit or PEFT)"),
    format: str = typer.Option(..., "--format", callback=lambda v: _one_of("--format", v, ("vllm", "gguf")),
                               help="vllm: an adapter folder vLLM applies exactly; gguf: a llama.cpp LoRA file"),
    out: Path = typer.Option(..., help="output folder (vllm) or .gguf file (gguf)"),
    model: Optional[str] = typer.Option(None, help="gguf: the base model ('default', a HF folder or a .gguf)"),
    dtype: Optional[str] = typer.Option(None, help="tensor dtype: fp32, bf16 or fp16 (vllm: the source's; gguf: fp32)"),
) -> None:
    """Write an adapter for another engine: vLLM (--enable-lora) or llama.cpp / Ollama (--lora)."""
    from .export import gguf_source, to_gguf, to_vllm

    table = Table.grid(padding=(0, 2))
    if format == "vllm":
        if model is not None:
            raise LorakitError("--model is for --format gguf; a vLLM export needs only the adapter folder")
        result = to_vllm(adapter, out, dtype=_dtype(dtype))
        rows = [("wrote", result.out), ("modules", result.modules),
                ("rank", f"{result.rank} everywhere, lora_alpha = {result.rank} (vLLM scaling 1)"),
                ("padded with zeros", f"{len(result.padded)} modules to rank {result.rank}"),
                ("scaling folded into lora_B", ", ".join(f"{s:g}" for s in sorted(set(result.folded.values())))),
                ("vLLM needs", result.vllm_flags),
                ("serve with", f"vllm serve BASE {result.vllm_flags} --lora-modules NAME={result.out}")]
        if result.other_adapters:
            rows.append(("not exported", f"subfolder adapters {result.other_adapters}: export each folder on its own"))
    else:
        base = model or "default"
        with console.status("loading the base model for its architecture"):
            result = to_gguf(adapter, out, base=base, dtype=_dtype(dtype or "fp32"))
        base_file = gguf_source(base) if base == "default" or base.endswith(".gguf") else "BASE.gguf"
        rows = [("wrote", result.out), ("tensor pairs", len(result.tensors)),
                ("adapter.lora.alpha", f"{result.alpha:g} (each pair keeps its rank, largest {result.rank}; "
                                       "per-module scaling folded into lora_b)"),
                ("run with", f"llama-cli -m {base_file} --lora {result.out}")]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", str(value))
    console.print(table)


def _one_of(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=option)
    return value


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
    threads: Optional[int] = typer.Option(None, help="torch threads (default: OMP_NUM_THREADS, else cores - 1)"),
) -> None:
    """OpenAI-compatible server: the base model and every adapter, batched together (continuous batching)."""
    flags = {k: v for k, v in locals().items() if k != "config" and v not in (None, [])}
    from .serve.server import run, serve_options

    run(serve_options(config, flags), log=lambda message: console.print(f"[dim]{message}[/dim]"))


def _print_estimate(cfg) -> None:
    from .train.estimate_table import estimate_table

    console.print(estimate_table(cfg.model, r=cfg.lora.r, target=cfg.lora.target_modules,
                                 batch_size=cfg.train.batch_size,
                                 seq_len=min(cfg.max_length, 64 if cfg.data == "default" else cfg.max_length)))


ERROR_FILE_ENV = "LORAKIT_ERROR_FILE"  # where a torchrun worker leaves its clear error for the launching command


def _relaunch_with_torchrun(nproc: int) -> None:
    """`lorakit train --nproc N ...` is `torchrun --nproc_per_node N -m lorakit train ...`.

    A worker's LorakitError comes back through a file and is printed as the one clear error; torchrun's own
    report of the failed worker (a long traceback) is then left out, and shown only when there is no such error.
    """
    import subprocess
    import tempfile

    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--nproc":
            del args[i:i + 2]
            break
        if arg.startswith("--nproc="):
            del args[i]
            break
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "lorakit", *args]
    with tempfile.TemporaryDirectory(prefix="lorakit-torchrun-") as folder:
        error_file = Path(folder) / "error"
        env = dict(os.environ) | {ERROR_FILE_ENV: str(error_file)}
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
        held = _forward_worker_output(process.stderr)
        code = process.wait()
        errors = error_file.read_text().splitlines() if error_file.exists() else []
    if code != 0 and errors:
        raise LorakitError(errors[0])
    sys.stderr.write("".join(held))
    raise SystemExit(code)


def _forward_worker_output(stream) -> list[str]:
    """Copy the workers' stderr through as it comes; hold back the launcher's failure report."""
    held: list[str] = []
    for line in stream:
        if held or line.startswith("Traceback (most recent call last)") or "torch.distributed.elastic" in line:
            held.append(line)
        else:
            sys.stderr.write(line)
            sys.stderr.flush()
    return held


def main() -> None:
    """Entry point: lorakit errors become one clear line and exit status 2, not a traceback."""
    try:
        app()
    except LorakitError as exc:
        error_file = os.environ.get(ERROR_FILE_ENV)
        if error_file:  # a torchrun worker: the launching command prints it once for all workers
            with open(error_file, "a") as handle:
                handle.write(" ".join(str(exc).split()) + "\n")
        else:
            Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
