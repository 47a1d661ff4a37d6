"""The memory estimate of LoRA, QLoRA and full fine-tuning side by side, as a rich Table for the CLI."""

from __future__ import annotations

import os
from typing import Any

import torch

from .estimate import METHODS, estimate
from .estimate_constants import EVAL_BATCH
from .loop import amp_dtype

TITLES = {"lora": "LoRA", "qlora": "QLoRA (nf4)", "full": "full fine-tuning"}


def estimate_table(
    source: str | os.PathLike = "default",
    r: int = 8,
    target: list[str] | str | None = None,
    batch_size: int = 16,
    seq_len: int = 48,
    precision: str = "auto",
) -> Any:
    """A rich Table of `estimate` for LoRA, QLoRA and full fine-tuning side by side."""
    from rich.table import Table

    results = [estimate(source, m, r, target, batch_size, seq_len, precision) for m in METHODS]
    dtype = amp_dtype(precision, torch.device("cpu"))
    table = Table(title=f"Memory to train {source} (one CPU process)",
                  caption=f"batch {batch_size} x {seq_len} tokens, LoRA r={r}, "
                          f"{'fp32' if dtype is None else str(dtype).removeprefix('torch.') + ' autocast'}; "
                          "sized from the config, no weights loaded")
    table.add_column("")
    for m in METHODS:
        table.add_column(TITLES[m], justify="right")
    rows = [("trainable parameters", lambda e: f"{e.trainable:,} ({100 * e.trainable / e.parameters:.2f}%)"),
            ("weights", lambda e: _size(e.weights)),
            ("gradients", lambda e: _size(e.gradients)),
            ("optimizer state (AdamW)", lambda e: _size(e.optimizer)),
            ("activations", lambda e: _size(e.activations)),
            (f"evaluation ({EVAL_BATCH} prompts)", lambda e: _size(e.evaluation)),
            ("allocator and job overhead", lambda e: _size(e.overhead)),
            ("runtime baseline", lambda e: _size(e.runtime)),
            ("total (peak RSS)", lambda e: f"[bold]{_size(e.total)}[/bold]")]
    for label, cell in rows:
        table.add_row(label, *(cell(e) for e in results))
    return table


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
