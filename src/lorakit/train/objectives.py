"""Losses and predictions for the two tasks, computed as cheaply as the model allows.

Causal-LM batches are left-padded, so every labelled position sits in the last few columns; the model is
asked for logits of those columns only (`logits_to_keep`), which skips most of the output head when
the loss is on a short completion. Position ids follow the attention mask so left padding changes nothing.
Packed batches (batching.pack) carry their own position ids, and the output head runs on the labelled
positions only, gathered from wherever they sit in the rows.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batching import IGNORE_INDEX

def shifted_targets(batch: dict[str, Tensor]) -> Tensor:
    """The token each position predicts, IGNORE_INDEX where there is none: position t predicts labels[t + 1]
    only when both t and t + 1 are real tokens, so a row's first token after left padding is not a target
    predicted from a pad."""
    labels, mask = batch["labels"], batch["attention_mask"]
    real = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    return labels[:, 1:].masked_fill(~real, IGNORE_INDEX)


def target_count(batch: dict[str, Tensor]) -> int:
    """How many predictions a batch's loss sums over: shifted causal-LM targets, or one label per row."""
    labels = batch["labels"]
    return int((shifted_targets(batch) != IGNORE_INDEX).sum()) if labels.dim() > 1 else labels.numel()


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """(sum of token losses over the shifted targets, number of targets)."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shifted_targets(batch)
    labelled = targets != IGNORE_INDEX
    count = int(labelled.sum())
    if count == 0:
        return input_ids.new_zeros((), dtype=torch.float32), 0
    first = int(labelled.any(0).nonzero()[0])  # earliest column (of the shifted targets) with a label
    keep = targets.shape[1] - first
    logits = tail_logits(model, input_ids, mask, keep + 1)[:, :-1]  # the last column predicts past the input
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets[:, first:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, count


def packed_causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """causal_lm_loss of a packed batch (batching.pack): the same sum over the same targets."""
    targets = shifted_targets(batch)
    where = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    count = int(where[0].numel())
    if count == 0:
        return batch["input_ids"].new_zeros((), dtype=torch.float32), 0
    logits = packed_logits(model, batch, where)
    return F.cross_entropy(logits.float(), targets[where], reduction="sum"), count


def packed_logits(model: nn.Module, batch: dict[str, Tensor], where: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Logits of a packed batch: (positions, vocab) at `where` (rows, columns), else (rows, width, vocab).

    No attention mask goes in: transformers finds where each sequence starts from the position ids when the
    mask is absent, and masks attention block by block (train/packing.py checks a model does). The output
    head sees the hidden states at `where` only, gathered by a hook, so it costs what the targets need.
    """
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    if where is None:
        return model(**kwargs).logits
    output_embeddings = getattr(_unwrap(model), "get_output_embeddings", None)
    head = output_embeddings() if output_embeddings is not None else None
    if head is None:
        return model(**kwargs).logits[where]
    hook = head.register_forward_pre_hook(lambda module, args: (args[0][where].unsqueeze(0), *args[1:]))
    try:
        return model(**kwargs).logits[0]
    finally:
        hook.remove()


def classification_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), batch["labels"].numel()


def tail_logits(model: nn.Module, input_ids: Tensor, mask: Tensor, n: int) -> Tensor:
    """Logits of the last `n` positions, shape (batch, n, vocab); the head runs on those only if it can."""
    kwargs = {"input_ids": input_ids, "attention_mask": mask}
    accepted = _forward_arguments(type(_unwrap(model)))
    if "position_ids" in accepted:
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    if "use_cache" in accepted:
        kwargs["use_cache"] = False  # one pass: a KV cache would only hold memory
    if "logits_to_keep" not in accepted:
        return model(**kwargs).logits[:, -n:]
    # Positions by index, not a count: transformers slices a count as a strided view, and the frozen head
    # then runs as a batched matmul that reads the whole (vocab x hidden) weight once per row; an index
    # gathers the positions into a contiguous tensor, and the head is one matrix multiply.
    width = input_ids.shape[1]
    kwargs["logits_to_keep"] = torch.arange(max(width - n, 0), width, device=input_ids.device)
    return model(**kwargs).logits


@torch.no_grad()
def classification_predictions(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)


def accepts(model: nn.Module, argument: str) -> bool:
    """Whether the (possibly DDP-wrapped) model's forward takes `argument`."""
    return argument in _forward_arguments(type(_unwrap(model)))


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


@lru_cache(maxsize=None)
def _forward_arguments(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)
