"""The main job behind `lorakit train`: model + data -> metric before -> LoRA training -> metric after ->
adapter in PEFT layout -> check that the merged model predicts the same -> summary and curves.
With `full_finetune` every weight trains instead and the whole model is saved (safetensors) in its place.

With no arguments it fine-tunes the embedded default (SmolLM2-135M-Instruct on the movie-review sentiment
sentences, see train/sentiment.py) as an instruction: "Review: ...\\nSentiment:" -> " positive"/" negative".
"""

from __future__ import annotations

import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import adapter_files as io, adapters, atomic
from ..errors import LorakitError
from ..inject import inject
from ..state import lora_layers
from . import data, distributed, run_folder, sentiment
from .evaluate import ChoiceTask, choice_eval, choice_predictions, classification_eval, loss_eval
from .job_config import JobConfig
from .loop import Trainer, TrainResult, amp_dtype, autocast
from .objectives import classification_loss
from .packing import train_batching
from .plots import plot_curves

MAX_CHOICES = 16  # completions drawn from at most this many strings are scored as a choice (accuracy)


@dataclass
class Prepared:
    """Everything task-specific the job needs: examples, batching, loss and evaluation."""

    task: str
    train: list[Any]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    loss_fn: Callable
    evaluate: Callable[[nn.Module], dict[str, float]]
    choice: ChoiceTask | None = None
    n_eval: int = 0


@dataclass
class JobReport:
    trainable: int
    total: int
    train: TrainResult
    before: dict[str, float]
    after: dict[str, float]
    peak_memory_mb: float
    adapter_dir: Path | None  # the trained adapter (PEFT layout); None for full fine-tuning
    curve: Path | None
    merged_agreement: tuple[int, int] | None
    n_train: int
    n_eval: int
    model_dir: Path | None = None  # full fine-tuning: the whole trained model (Hugging Face folder)


def run_job(cfg: JobConfig, progress: bool = True, log: Callable[[str], None] = print) -> JobReport:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    distributed.setup(device)
    say = log if distributed.is_main() else (lambda message: None)
    out = Path(cfg.out)
    lock = run_folder.open_run(out, run_folder.describe_job(cfg.settings()), cfg.resume, cfg.overwrite, say) \
        if distributed.is_main() else None  # checked and locked before anything loads
    try:
        return _run(cfg, device, out, progress, say)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: JobConfig, device: torch.device, out: Path, progress: bool, say: Callable[[str], None]) -> JobReport:
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    say(f"loading model {cfg.model!r} and data {cfg.data!r}")
    model, tokenizer, prepared = prepare(cfg, device)
    trainable, total = adapters.count_parameters(model)
    method = "full fine-tuning" if cfg.full_finetune else f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha}"
    say(f"{method}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%), {len(prepared.train):,} training examples, {prepared.n_eval:,} held out")
    precision = amp_dtype(cfg.train.precision, device)

    def evaluate() -> dict[str, float]:
        with autocast(device, precision):
            return prepared.evaluate(model)

    before = {}
    if cfg.eval_before:
        base = evaluate if cfg.full_finetune else lambda: _evaluate_base(model, evaluate)
        before = _timed(say, "evaluating before training", base)
    trainer = Trainer(model, prepared.train, prepared.collate, prepared.loss_fn, cfg.train, out,
                      evaluate=evaluate, progress=progress)
    result = trainer.run(resume=cfg.resume)
    after = _timed(say, "evaluating after training", evaluate)
    adapter_dir, model_dir = (None, out / "model") if cfg.full_finetune else (out / "adapter", None)
    if distributed.is_main() and model_dir is not None:
        model_dir = run_folder.save_with_fallback(lambda folder: _save_model(model, tokenizer, folder), model_dir)
    elif distributed.is_main():
        adapter_dir = run_folder.save_with_fallback(lambda folder: _save_adapter(model, tokenizer, folder), adapter_dir)
    mergeable = adapter_dir is not None and not any(layer.lora_merge_blocker for _, layer in lora_layers(model))
    agreement = _merged_agreement(model, prepared) if prepared.choice is not None and mergeable else None
    title = f"lorakit train: {cfg.model} model on {cfg.data} data"
    curve = plot_curves(result.history, out / "curves.png", title, before, after) if distributed.is_main() else None
    distributed.barrier()
    return JobReport(trainable, total, result, before, after, _peak_memory_mb(device), adapter_dir, curve,
                     agreement, len(prepared.train), prepared.n_eval, model_dir)


def _save_adapter(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """The adapter and its tokenizer, swapped into `folder` as one unit."""
    with atomic.atomic_folder(folder) as staging:
        io.save(model, staging)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(staging)


def _save_model(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """The fully fine-tuned model and its tokenizer as a Hugging Face folder (safetensors weights)."""
    from ..models import save_hf_folder

    save_hf_folder(model, tokenizer, folder)


def evaluate_job(cfg: JobConfig, adapter: str | None = None, merged: bool = False) -> dict[str, float]:
    """The job's held-out metric for the base model, or for a saved adapter (merged or not)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _, prepared = prepare(cfg, device, adapter=adapter)
    if adapter and merged:
        adapters.merge(model)
    with autocast(device, amp_dtype(cfg.train.precision, device)):
        if adapter is None:
            with adapters.disabled(model):
                return prepared.evaluate(model)
        return prepared.evaluate(model)


def prepare(cfg: JobConfig, device: torch.device, adapter: str | None = None) -> tuple[nn.Module, Any, Prepared]:
    """Load model and data, apply a new adapter (or load `adapter`) and quantization, build the task; for full
    fine-tuning, make every weight trainable instead."""
    from ..models import load_base_model

    fmt, train_records, eval_records = _records(cfg)
    task = _task(cfg.task, fmt)
    labels = sorted({str(r["label"]) for r in train_records}) if task == "classification" else []
    overrides = {"num_labels": len(labels)} if labels else {}
    model, tokenizer = load_base_model(cfg.model, task=task, **overrides)
    if tokenizer is None:
        raise LorakitError(f"{cfg.model} has no tokenizer files; lorakit train needs one beside the weights")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if labels and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    if cfg.quantize:
        from ..quant import quantize_model

        quantize_model(model, cfg.quantize, compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                       embeddings=cfg.quantize_embeddings)
    head = _head_name(model) if task == "classification" else None
    if adapter is not None:
        io.load(model, adapter)
    elif cfg.full_finetune:
        model.requires_grad_(True)
    else:
        inject(model, cfg.lora.replace(modules_to_save=[head]) if head else cfg.lora)
    train = data.tokenize(train_records, tokenizer, fmt, cfg.max_length, label_names=labels or None)
    evaluation = data.tokenize(eval_records, tokenizer, fmt, cfg.max_length, label_names=labels or None)
    pad = tokenizer.pad_token_id
    if task == "classification":
        collate = lambda rows: data.collate(rows, pad, padding_side="right")  # noqa: E731
        return model, tokenizer, Prepared(task, train.examples, collate, classification_loss,
                                          lambda m: classification_eval(m, evaluation.examples, collate),
                                          n_eval=len(evaluation.examples))
    collate = lambda rows: data.collate(rows, pad, padding_side="left")  # noqa: E731
    choice = _choice_task(eval_records, tokenizer, fmt, cfg.max_length) if fmt == "prompt_completion" else None
    evaluate = (lambda m: choice_eval(m, choice)) if choice else \
        (lambda m: loss_eval(m, evaluation.examples, collate))
    train_collate, train_loss = train_batching(model, train.examples, pad, cfg.train.packing)
    return model, tokenizer, Prepared(task, train.examples, train_collate, train_loss, evaluate, choice,
                                      n_eval=len(eval_records))


def _records(cfg: JobConfig) -> tuple[str, list[dict], list[dict]]:
    """(format, training rows, held-out rows); every row is checked before the split, so an error names its
    file and line rather than a position in the shuffled split."""
    if cfg.data == "default":
        train, test = sentiment.load_splits(seed=0)
        to_record = lambda e: {"prompt": e.prompt, "completion": e.answer}  # noqa: E731
        train_records, eval_records = [to_record(e) for e in train], [to_record(e) for e in test]
        fmt = "prompt_completion"
    else:
        rows = data.load_records(cfg.data)
        fmt = data.detect_format(rows, origin=cfg.data)
        if cfg.eval_data:
            train_records, eval_records = rows, data.load_records(cfg.eval_data)
            eval_fmt = data.detect_format(eval_records, origin=cfg.eval_data)
            if eval_fmt != fmt:
                raise LorakitError(f"--eval-data {cfg.eval_data} is in the {eval_fmt} format but --data {cfg.data} "
                                   f"is in the {fmt} format; give both files the same fields")
        elif len(rows) < 2:
            raise LorakitError(f"{cfg.data} has one row, and it went to the held-out split (a seeded 10%, at least "
                               "one row), leaving nothing to train on; add rows or pass --eval-data")
        else:  # hold out a seeded 10% (at most 1,000 rows)
            order = list(range(len(rows)))
            random.Random(cfg.train.seed).shuffle(order)
            n_eval = min(1000, max(1, len(order) // 10))
            eval_records, train_records = rows.subset(order[:n_eval]), rows.subset(order[n_eval:])
    if cfg.eval_size:
        eval_records = eval_records[:cfg.eval_size]
    return fmt, train_records, eval_records


def _choice_task(records: list[dict], tokenizer: Any, fmt: str, max_length: int) -> ChoiceTask | None:
    """Accuracy applies when completions come from a few strings whose first tokens differ."""
    completions = sorted({r["completion"] for r in records})
    if len(completions) > MAX_CHOICES:
        return None
    first = [tokenizer(c, add_special_tokens=False).input_ids[:1] for c in completions]
    if any(not f for f in first) or len({f[0] for f in first}) != len(first):
        return None
    encoded = data.tokenize(records, tokenizer, fmt, max_length).examples
    if len(encoded) != len(records):
        return None  # some rows lost their answer to truncation; fall back to the loss
    return ChoiceTask(prompts=[_prompt_ids(e) for e in encoded],
                      answers=[completions.index(r["completion"]) for r in records],
                      candidate_ids=[f[0] for f in first], pad_id=tokenizer.pad_token_id)


def _prompt_ids(example: dict[str, list[int]]) -> list[int]:
    """The prompt part of a tokenized prompt/completion example (labels are IGNORE_INDEX there)."""
    ids, labels = example["input_ids"], example["labels"]
    end = next((i for i, label in enumerate(labels) if label != data.IGNORE_INDEX), len(ids))
    return list(ids[:end])


def _evaluate_base(model: nn.Module, evaluate: Callable[[], dict[str, float]]) -> dict[str, float]:
    with adapters.disabled(model):
        return evaluate()


def _merged_agreement(model: nn.Module, prepared: Prepared, n: int = 100) -> tuple[int, int]:
    """How many of n held-out prompts the merged model predicts exactly as the unmerged one (in fp32)."""
    rows = list(range(min(n, len(prepared.choice.prompts))))
    unmerged = choice_predictions(model, prepared.choice, rows)
    adapters.merge(model)
    try:
        merged = choice_predictions(model, prepared.choice, rows)
    finally:
        adapters.unmerge(model)
    return int((merged == unmerged).sum()), len(rows)


def _task(requested: str | None, fmt: str) -> str:
    """The task the data trains, or the one asked for when the data fits it."""
    fits = data.infer_task(fmt)
    if requested is not None and requested != fits:
        needs = "rows with 'text' and 'label'" if requested == "classification" else \
            "rows with 'text', 'prompt' + 'completion' or 'messages'"
        raise LorakitError(f"--task {requested} needs {needs}, but the data is in the {fmt} format "
                           f"({' + '.join(data.FIELDS[fmt])}); drop --task to train {fits}")
    return fits


def _head_name(model: nn.Module) -> str:
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise LorakitError(f"{type(model).__name__} has no 'score' or 'classifier' head to train for classification")


def _timed(say: Callable[[str], None], what: str, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    start = time.perf_counter()
    result = fn()
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
    say(f"{what}: {shown} ({time.perf_counter() - start:.0f} s)")
    return result


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
