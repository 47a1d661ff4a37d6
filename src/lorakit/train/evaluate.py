"""Evaluation: accuracy over a fixed set of answers (the demo), classification accuracy, and causal-LM loss.

Prompts are evaluated in length-sorted batches (little padding) and, under torchrun, split over ranks
with the counts summed, so every process reports the same figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .batching import left_pad
from .objectives import causal_lm_loss, classification_predictions, tail_logits


@dataclass
class ChoiceTask:
    """Prompts whose answer is one of a few completions told apart by their first token."""

    prompts: list[list[int]]  # token ids of each prompt
    answers: list[int]  # index into candidate_ids of each prompt's answer
    candidate_ids: list[int]  # first token of each candidate completion
    pad_id: int


def choice_eval(model: nn.Module, task: ChoiceTask, batch_size: int = 64) -> dict[str, float]:
    """accuracy and the mean loss of the answer's first token, from one forward per prompt."""
    device = next(model.parameters()).device
    candidates = torch.tensor(task.candidate_ids, device=device)
    order = _my_share(sorted(range(len(task.prompts)), key=lambda i: len(task.prompts[i])))
    correct, loss_sum = 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = left_pad([task.prompts[i] for i in rows], task.pad_id, device)
            logits = tail_logits(model, ids, mask, 1)[:, 0].float()
            answers = torch.tensor([task.answers[i] for i in rows], device=device)
            correct += float((logits[:, candidates].argmax(-1) == answers).sum())
            loss_sum += float(F.cross_entropy(logits, candidates[answers], reduction="sum"))
    n = len(task.prompts)
    return {"accuracy": distributed.all_reduce_sum(correct, device) / n,
            "eval_loss": distributed.all_reduce_sum(loss_sum, device) / n}


def choice_predictions(model: nn.Module, task: ChoiceTask, rows: list[int], batch_size: int = 64) -> Tensor:
    """Predicted candidate index for the given prompts (one process, in the given order)."""
    device = next(model.parameters()).device
    candidates = torch.tensor(task.candidate_ids, device=device)
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, mask = left_pad([task.prompts[i] for i in chunk], task.pad_id, device)
            out.append(tail_logits(model, ids, mask, 1)[:, 0][:, candidates].argmax(-1).cpu())
    return torch.cat(out)


def classification_eval(model: nn.Module, examples: list[Any], collate: Callable, batch_size: int = 64) -> dict:
    device = next(model.parameters()).device
    correct = 0.0
    model.eval()
    for start in range(0, len(examples), batch_size):
        rows = _my_share(list(range(start, min(start + batch_size, len(examples)))))
        if not rows:
            continue
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows]).items()}
        correct += float((classification_predictions(model, batch) == batch["labels"]).sum())
    return {"accuracy": distributed.all_reduce_sum(correct, device) / len(examples)}


def loss_eval(model: nn.Module, examples: list[Any], collate: Callable, batch_size: int = 16) -> dict[str, float]:
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            rows = _my_share(list(range(start, min(start + batch_size, len(examples)))))
            if not rows:
                continue
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows]).items()}
            loss, n = causal_lm_loss(model, batch)
            total, count = total + float(loss), count + n
    total, count = distributed.all_reduce_sum(total, device), distributed.all_reduce_sum(count, device)
    mean = total / max(count, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50))}


def _my_share(items: list[int]) -> list[int]:
    return items[distributed.rank()::distributed.world_size()]
