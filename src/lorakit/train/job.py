"""The main job behind `lorakit train`: model + data -> metric before -> LoRA training -> metric after ->
adapter in PEFT layout -> check that the merged model predicts the same -> summary and curves.

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

from .. import adapters, io
from ..config import LoraConfig
from ..errors import LorakitError
from ..inject import inject
from ..state import lora_layers
from . import data, distributed, sentiment
from .evaluate import ChoiceTask, choice_eval, choice_predictions, classification_eval, loss_eval
from .loop import Trainer, TrainResult, TrainSettings, amp_dtype, autocast
from .objectives import causal_lm_loss, classification_loss
from .plots import plot_curves

TASKS = ("causal-lm", "classification")
MAX_CHOICES = 16  # completions drawn from at most this many strings are scored as a choice (accuracy)


@dataclass
class JobConfig:
    """Every setting of `lorakit train`; the CLI flags and --config files map onto these fields."""

    model: str = "default"
    data: str = "default"
    eval_data: str | None = None
    task: str | None = None
    out: str = "runs/train"
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    lora_plus_ratio: float = 1.0
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    init: str = "kaiming"
    use_dora: bool = False
    use_rslora: bool = False
    target: list[str] | str | None = None
    quantize: str | None = None
    quantize_embeddings: str | None = None  # with quantize: also the embeddings and head (int8, nf4, fp4)
    seed: int = 0
    resume: bool = False
    max_length: int = 256
    eval_every: int = 0
    eval_size: int | None = None
    save_every: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise LorakitError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.quantize_embeddings and not self.quantize:
            raise LorakitError("--quantize-embeddings applies to a quantized base; add --quantize nf4")


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
    adapter_dir: Path
    curve: Path | None
    merged_agreement: tuple[int, int] | None
    n_train: int
    n_eval: int


def run_job(cfg: JobConfig, progress: bool = True, log: Callable[[str], None] = print) -> JobReport:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    distributed.setup(device)
    say = log if distributed.is_main() else (lambda message: None)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    say(f"loading model {cfg.model!r} and data {cfg.data!r}")
    model, tokenizer, prepared = prepare(cfg, device)
    trainable, total = adapters.count_parameters(model)
    say(f"LoRA r={cfg.r} alpha={cfg.alpha}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%), {len(prepared.train):,} training examples, {prepared.n_eval:,} held out")
    precision = amp_dtype(cfg.precision, device)

    def evaluate() -> dict[str, float]:
        with autocast(device, precision):
            return prepared.evaluate(model)

    before = _timed(say, "evaluating before training", lambda: _evaluate_base(model, evaluate))
    trainer = Trainer(model, prepared.train, prepared.collate, prepared.loss_fn, _settings(cfg), out,
                      evaluate=evaluate, progress=progress)
    result = trainer.run(resume=cfg.resume)
    after = _timed(say, "evaluating after training", evaluate)
    adapter_dir = out / "adapter"
    if distributed.is_main():
        io.save(model, adapter_dir)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(adapter_dir)
    mergeable = not any(layer.lora_merge_blocker for _, layer in lora_layers(model))  # 4-bit bases are not
    agreement = _merged_agreement(model, prepared) if prepared.choice is not None and mergeable else None
    title = f"lorakit train: {cfg.model} model on {cfg.data} data"
    curve = plot_curves(result.history, out / "curves.png", title, before, after) if distributed.is_main() else None
    distributed.barrier()
    return JobReport(trainable, total, result, before, after, _peak_memory_mb(device), adapter_dir, curve,
                     agreement, len(prepared.train), prepared.n_eval)


def evaluate_job(cfg: JobConfig, adapter: str | None = None, merged: bool = False) -> dict[str, float]:
    """The job's held-out metric for the base model, or for a saved adapter (merged or not)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _, prepared = prepare(cfg, device, adapter=adapter)
    if adapter and merged:
        adapters.merge(model)
    with autocast(device, amp_dtype(cfg.precision, device)):
        if adapter is None:
            with adapters.disabled(model):
                return prepared.evaluate(model)
        return prepared.evaluate(model)


def prepare(cfg: JobConfig, device: torch.device, adapter: str | None = None) -> tuple[nn.Module, Any, Prepared]:
    """Load model and data, apply a new adapter (or load `adapter`) and quantization, build the task."""
    from ..models import load_base_model

    train_records, eval_records = _records(cfg)
    fmt = data.detect_format(train_records)
    task = cfg.task or data.infer_task(fmt)
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
    else:
        inject(model, LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target,
                                 init=cfg.init, use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
                                 modules_to_save=[head] if head else []))
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
    return model, tokenizer, Prepared(task, train.examples, collate, causal_lm_loss, evaluate, choice,
                                      n_eval=len(eval_records))


def _records(cfg: JobConfig) -> tuple[list[dict], list[dict]]:
    if cfg.data == "default":
        train, test = sentiment.load_splits(seed=0)
        to_record = lambda e: {"prompt": e.prompt, "completion": e.answer}  # noqa: E731
        train_records, eval_records = [to_record(e) for e in train], [to_record(e) for e in test]
    else:
        train_records = data.load_records(cfg.data)
        if cfg.eval_data:
            eval_records = data.load_records(cfg.eval_data)
        else:  # hold out a seeded 10% (at most 1,000 rows)
            order = list(range(len(train_records)))
            random.Random(cfg.seed).shuffle(order)
            n_eval = min(1000, max(1, len(order) // 10))
            eval_records = [train_records[i] for i in order[:n_eval]]
            train_records = [train_records[i] for i in order[n_eval:]]
    if cfg.eval_size:
        eval_records = eval_records[:cfg.eval_size]
    return train_records, eval_records


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
    """The prompt part of a tokenized prompt/completion example (labels are -100 there)."""
    ids, labels = example["input_ids"], example["labels"]
    end = next((i for i, label in enumerate(labels) if label != -100), len(ids))
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


def _settings(cfg: JobConfig) -> TrainSettings:
    return TrainSettings(steps=cfg.steps, epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                         lr=cfg.lr, lora_plus_ratio=cfg.lora_plus_ratio, weight_decay=cfg.weight_decay,
                         warmup_ratio=cfg.warmup_ratio, eval_every=cfg.eval_every, save_every=cfg.save_every,
                         seed=cfg.seed, precision=cfg.precision, gradient_checkpointing=cfg.gradient_checkpointing)


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
