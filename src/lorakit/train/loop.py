"""The training loop the library and the CLI share: AdamW (LoRA+ groups), warmup + cosine, accumulation,
clipping, mixed precision, checkpoints with exact resume, and DDP across processes.

Every optimizer step sees one global batch of `batch_size` examples, fixed by (seed, epoch, step), split
over ranks and accumulation micro-batches; the loss is normalised by the global number of prediction
targets (objectives.target_count), so one process and N processes compute the same update.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import atomic
from ..errors import LorakitError
from ..optim import param_groups, warmup_cosine
from . import checkpoint, distributed
from .metrics import METRICS, strict_json
from .objectives import target_count
from .batching import batch_order, shard
from .saved_activations import lean_saved_activations

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Settings a resumed run may change: they steer evaluation, saving and speed, not what is learned.
RESUMABLE_CHANGES = ("eval_every", "save_every", "precision", "gradient_checkpointing", "packing")
LossFn = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, int]]


@dataclass
class TrainSettings:
    """Optimisation settings; `batch_size` is the global batch of one optimizer step."""

    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    lora_plus_ratio: float = 1.0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    packing: bool = True  # causal-LM jobs: examples share rows instead of padding (train/packing.py)

    def __post_init__(self) -> None:
        """Types and ranges, so a bad value fails here and not steps into a run."""
        for name in ("batch_size", "grad_accum"):
            _check_number(name, getattr(self, name), integer=True, low=1)
        if self.steps is not None:
            _check_number("steps", self.steps, integer=True, low=1)
        for name in ("eval_every", "save_every"):
            _check_number(name, getattr(self, name), integer=True, low=0)
        _check_number("seed", self.seed, integer=True, low=0, high=2**32 - 1)
        _check_number("epochs", self.epochs, low=0, open_low=True)
        _check_number("lr", self.lr, low=0, open_low=True)
        _check_number("lora_plus_ratio", self.lora_plus_ratio, low=0, open_low=True)
        _check_number("weight_decay", self.weight_decay, low=0)
        _check_number("warmup_ratio", self.warmup_ratio, low=0, high=1, open_high=True)
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, low=0, open_low=True)
        for name in ("gradient_checkpointing", "packing"):
            if not isinstance(getattr(self, name), bool):
                raise LorakitError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise LorakitError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def _check_number(name: str, value: Any, integer: bool = False, low: float | None = None, high: float | None = None,
                  open_low: bool = False, open_high: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
        or (low is not None and (value <= low if open_low else value < low)) \
        or (high is not None and (value >= high if open_high else value > high))
    if bad:
        lower = "" if low is None else f"{'>' if open_low else '>='} {low}"
        upper = "" if high is None else f"{'<' if open_high else '<='} {high}"
        bounds = " and ".join(b for b in (lower, upper) if b)
        kind = "an integer" if integer else "a number"
        raise LorakitError(f"{name} must be {kind}{' ' + bounds if bounds else ''}, got {value!r}")


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        losses = [h["loss"] for h in self.history if "loss" in h]
        return losses[-1] if losses else float("nan")


class Trainer:
    """Runs `settings` on `model` (already injected) over `examples`, batched by `collate`."""

    def __init__(self, model: nn.Module, examples: list[Any], collate: Callable[[list[Any]], dict[str, Tensor]],
                 loss_fn: LossFn, settings: TrainSettings, out_dir: Path | None = None,
                 evaluate: Callable[[], dict[str, float]] | None = None,
                 on_step: Callable[[int], None] | None = None, progress: bool = True) -> None:
        if not examples:
            raise LorakitError("no training examples")
        self.model, self.examples, self.collate, self.loss_fn = model, examples, collate, loss_fn
        self.settings, self.out_dir, self.evaluate, self.on_step = settings, out_dir, evaluate, on_step
        self.device = next(model.parameters()).device
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if settings.batch_size % (self.world * settings.grad_accum):
            raise LorakitError(f"batch_size {settings.batch_size} must divide evenly over {self.world} processes x "
                               f"{settings.grad_accum} accumulation steps")
        self.per_epoch = math.ceil(len(examples) / settings.batch_size)
        self.total = settings.steps or max(1, math.ceil(settings.epochs * self.per_epoch))
        self.progress = progress and distributed.is_main()
        self.amp_dtype = amp_dtype(settings.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if settings.gradient_checkpointing:
            _enable_checkpointing(model)
        self.ddp = distributed.wrap(model)
        self.optimizer = torch.optim.AdamW(param_groups(model, settings.lr, settings.lora_plus_ratio,
                                                        settings.weight_decay))
        self.scheduler = warmup_cosine(self.optimizer, int(settings.warmup_ratio * self.total), self.total)

    # ---- public ------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        if not resume:
            self._start_metrics()
        step, history = self._resume() if resume else (0, [])
        result = TrainResult(steps=step, seconds=0.0, tokens=0, history=history)
        start = time.perf_counter()
        self.model.train()
        with self._progress_bar(step) as advance:
            while step < self.total:
                loss, tokens = self._step(step)
                step += 1
                result.tokens += tokens
                elapsed = time.perf_counter() - start
                record = {"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                          "tokens_per_s": result.tokens / max(elapsed, 1e-9)}
                if self.evaluate and self.settings.eval_every and step % self.settings.eval_every == 0 \
                        and step < self.total:
                    record |= self._evaluate()
                self._log(record, result)
                if not math.isfinite(loss):
                    raise LorakitError(f"loss became {loss} at step {step}; lower the learning rate (--lr), clip "
                                       "gradients, or train in fp32 (--precision fp32)")
                advance(record)
                if self.settings.save_every and step % self.settings.save_every == 0 and step < self.total:
                    self._checkpoint(step, result.history)
                if self.on_step:
                    self.on_step(step)
        result.steps, result.seconds = step, time.perf_counter() - start
        self.model.eval()
        return result

    # ---- one optimizer step ----------------------------------------------------------------------------
    def _step(self, step: int) -> tuple[float, int]:
        epoch, index = divmod(step, self.per_epoch)
        global_batch = batch_order(len(self.examples), self.settings.batch_size, self.settings.seed, epoch)[index]
        mine = shard([global_batch], self.rank, self.world)[0]
        micro = [mine[i::self.settings.grad_accum] for i in range(self.settings.grad_accum)]
        batches = [_to(self.collate([self.examples[i] for i in m]), self.device) for m in micro if m]
        local_count = sum(target_count(b) for b in batches)
        global_count = distributed.all_reduce_sum(local_count, self.device)
        loss_sum, tokens = 0.0, 0
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with self._no_sync(not sync), autocast(self.device, self.amp_dtype), lean_saved_activations():
                loss, _ = self.loss_fn(self.ddp, batch)
            scaled = loss * (self.world / max(global_count, 1.0))
            self.scaler.scale(scaled).backward()
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        mean_loss = distributed.all_reduce_sum(loss_sum, self.device) / max(global_count, 1.0)
        if not math.isfinite(mean_loss):  # no update from it; run() records the step, then stops
            self.optimizer.zero_grad(set_to_none=True)
            return mean_loss, int(distributed.all_reduce_sum(tokens, self.device))
        self.scaler.unscale_(self.optimizer)
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.settings.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, int(distributed.all_reduce_sum(tokens, self.device))

    # ---- helpers ---------------------------------------------------------------------------------------
    def _no_sync(self, skip: bool):
        return self.ddp.no_sync() if skip and hasattr(self.ddp, "no_sync") else contextlib.nullcontext()

    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            return self.evaluate() if self.evaluate else {}
        finally:
            self.model.train()

    def _log(self, record: dict[str, Any], result: TrainResult) -> None:
        result.history.append(record)
        if self.out_dir is not None and distributed.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / METRICS, "a") as handle:
                handle.write(strict_json(record) + "\n")

    def _start_metrics(self) -> None:
        """A fresh run never appends to metrics another run wrote."""
        if self.out_dir is not None and distributed.is_main() and (self.out_dir / METRICS).exists():
            raise LorakitError(f"{self.out_dir} already holds {METRICS} of an earlier run; resume it (resume=True) "
                               "or train into another folder")

    def _checkpoint(self, step: int, history: list[dict[str, Any]]) -> None:
        if self.out_dir is not None and distributed.is_main():
            checkpoint.save(self.out_dir / "checkpoints", step, self.model, self.optimizer, self.scheduler,
                            {"history": history, "settings": asdict(self.settings), "examples": len(self.examples)})
        distributed.barrier()

    def _resume(self) -> tuple[int, list[dict[str, Any]]]:
        path = checkpoint.latest(self.out_dir / "checkpoints") if self.out_dir else None
        if path is None:
            raise LorakitError(f"--resume: no checkpoint under {self.out_dir}/checkpoints (they are written every "
                               "--save-every steps); start the run afresh with --overwrite instead of --resume")
        state = checkpoint.read_state(path)
        self._check_same_job(path, state["extra"])
        state = checkpoint.restore(path, self.model, self.optimizer, self.scheduler, state)
        if self.out_dir is not None and distributed.is_main():  # metrics after the checkpoint are replayed
            lines = [strict_json(r) for r in state["extra"]["history"]]
            atomic.write_text(self.out_dir / METRICS, "".join(line + "\n" for line in lines))
        return state["step"], list(state["extra"]["history"])

    def _check_same_job(self, path: Path, saved: dict[str, Any]) -> None:
        """A checkpoint continues only the job that wrote it: same optimisation settings and data size."""
        now = asdict(self.settings) | {"examples": len(self.examples)}
        was = saved.get("settings", {}) | {"examples": saved.get("examples")}
        changed = [f"{k}: was {was.get(k)!r}, now {now[k]!r}" for k in sorted(now)
                   if k not in RESUMABLE_CHANGES and was.get(k) != now[k]]
        if changed:
            raise LorakitError(f"--resume: {path} was written with other settings ({'; '.join(changed)}); resume "
                               "with the same settings, or start a new run in another folder")

    @contextlib.contextmanager
    def _progress_bar(self, step: int):
        if not self.progress:
            yield lambda record: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TextColumn("{task.fields[speed]} tok/s"), TextColumn("ETA"), TimeRemainingColumn()]
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task("train", total=self.total, completed=step, loss="-", speed="-")
            yield lambda r: bar.update(task, advance=1, loss=f"{r['loss']:.4f}", speed=f"{r['tokens_per_s']:,.0f}")


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting; "auto" picks bf16 where the hardware computes it fast
    (CUDA with bf16, CPUs with AVX512-BF16 or AMX), fp16 on older GPUs, and fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        fast_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if fast_bf16 else None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype, enabled=dtype is not None) if dtype else contextlib.nullcontext()


def _enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward; non-reentrant, so it works with a frozen base and LoRA inputs."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise LorakitError("gradient checkpointing needs a Hugging Face model (gradient_checkpointing_enable)")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
