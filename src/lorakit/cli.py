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


def main() -> None:
    """Entry point: lorakit errors become one clear line and exit status 2, not a traceback."""
    try:
        app()
    except LorakitError as exc:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
