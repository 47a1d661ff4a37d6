"""The table `lorakit train` prints at the end."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .job import JobReport
from .job_config import JobConfig


def print_summary(console: Console, cfg: JobConfig, report: JobReport) -> None:
    table = Table(title="lorakit train: summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    share = 100 * report.trainable / report.total
    rows = [
        ("model / data", f"{cfg.model} / {cfg.data}"),
        ("method", "full fine-tuning (every weight)" if cfg.full_finetune else
         f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, targets={cfg.lora.target_modules or 'architecture default'}"),
        ("trainable parameters", f"{report.trainable:,} of {report.total:,} ({share:.2f}%)"),
        ("examples", f"{report.n_train:,} train, {report.n_eval:,} held out"),
        ("steps", f"{report.train.steps} x batch {cfg.train.batch_size}"),
        ("time", f"{report.train.seconds:.0f} s training, {report.train.tokens / max(report.train.seconds, 1e-9):,.0f}"
                 " tokens/s"),
        ("peak memory", f"{report.peak_memory_mb:,.0f} MB"),
    ]
    for key in sorted(set(report.before) | set(report.after)):
        before, after = report.before.get(key), report.after.get(key)
        rows.append((f"{key} before -> after", f"{_fmt(before)} -> {_fmt(after)}"))
    if report.merged_agreement:
        same, n = report.merged_agreement
        rows.append(("merged model", f"same predictions on {same}/{n} held-out prompts"))
    if report.adapter_dir is not None:
        rows.append(("adapter (PEFT layout)", str(report.adapter_dir)))
    if report.model_dir is not None:
        rows.append(("model (Hugging Face folder)", str(report.model_dir)))
    if report.curve:
        rows.append(("curves", str(report.curve)))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
