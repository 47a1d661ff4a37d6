"""Optimizer set-up for adapters: LoRA+ parameter groups and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import LorakitError


def param_groups(model: nn.Module, lr: float, ratio: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """Trainable parameters in two groups: B matrices at `ratio` x lr (LoRA+), everything else at lr.

    LoRA+ (Hayou et al., 2024) finds that B learning faster than A speeds up training; ratio=1 is plain LoRA.
    """
    if ratio <= 0 or lr <= 0:
        raise LorakitError(f"lr and ratio must be > 0, got lr={lr}, ratio={ratio}")
    fast, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (fast if ".lora_B." in f".{name}" else rest).append(param)
    if not fast and not rest:
        raise LorakitError("the model has no trainable parameters; inject an adapter or lk.set_trainable(model, name)")
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay},
              {"params": fast, "lr": lr * ratio, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's lr, then cosine decay to min_ratio x lr at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
