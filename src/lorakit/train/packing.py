"""Whether a causal-LM job trains on packed rows (batching.pack) or on padded ones, decided per model.

Packing relies on the model telling sequences apart by position ids that restart at 0 (transformers does
this for its decoder models when no attention mask is given). A model that ignored them would let packed
sequences attend to each other and learn from the wrong context without any error, so before training a
few real examples are packed into one row and each one's logits are compared with the example run alone;
a model that fails falls back to padding, with a warning that says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .batching import collate, pack
from .objectives import accepts, causal_lm_loss, packed_causal_lm_loss, packed_logits

PROBE_EXAMPLES = 3  # packed into one row: the second and third would see the first if packing leaked
Collate = Callable[[list[Any]], dict[str, Tensor]]


def train_batching(model: nn.Module, examples: Sequence[Mapping[str, Any]], pad_id: int | None,
                   packing: bool) -> tuple[Collate, Callable]:
    """(collate, loss) for training causal-LM `examples`: packed where asked for and the model honours it,
    else left padding (objectives.causal_lm_loss keeps the head on the last columns there)."""
    if packing:
        problem = packing_problem(model, examples, pad_id)
        if problem is None:
            return (lambda rows: pack(rows, pad_id)), packed_causal_lm_loss
        warnings.warn(f"packing is off for this model: {problem}; batches are padded instead (same results, more "
                      "work). Set packing: false to silence this.", stacklevel=2)
    return (lambda rows: collate(rows, pad_id, padding_side="left")), causal_lm_loss


@torch.no_grad()
def packing_problem(model: nn.Module, examples: Sequence[Mapping[str, Any]], pad_id: int | None) -> str | None:
    """Why `model` cannot train on packed rows, or None when each of a few examples packed into one row gets
    the logits it gets alone (to float32 round-off; a wider margin for 16-bit models)."""
    if not accepts(model, "position_ids"):
        return f"{type(model).__name__}.forward takes no position_ids"
    sample = list(examples[:PROBE_EXAMPLES])
    if len(sample) < 2:
        return None  # one example never shares a row
    width = sum(len(example["input_ids"]) for example in sample) + 1  # one row, and a pad to show it is ignored
    batch = {k: v.to(_device(model)) for k, v in pack(sample, pad_id, width=width).items()}
    starts = (batch["position_ids"][0] == 0).nonzero()[:, 0].tolist()[:len(sample)]  # pack orders by length
    ends = [*starts[1:], int(batch["attention_mask"][0].sum())]
    was_training = model.training
    model.eval()
    try:
        row = packed_logits(model, batch)[0]
        for k, (start, end) in enumerate(zip(starts, ends)):
            alone = packed_logits(model, {"input_ids": batch["input_ids"][:1, start:end],
                                          "position_ids": torch.arange(end - start, device=row.device)[None]})[0]
            tolerance = (1e-4 if alone.dtype == torch.float32 else 3e-2) * max(1.0, float(alone.abs().max()))
            error = float((row[start:end].float() - alone.float()).abs().max())
            if not error <= tolerance:
                return (f"sequence {k + 1} of {len(sample)} packed into one row got logits up to {error:.3g} away "
                        f"from its own (allowed {tolerance:.3g}), so packed sequences would see each other")
    finally:
        model.train(was_training)
    return None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
