"""How much memory training will take, measured on the model built from its config alone: the numbers behind
`lorakit estimate` and `train --dry-run` (their table: estimate_table.py; constants tuned on measured jobs:
estimate_constants.py).

No weight is read. The model is built on the meta device and adapted exactly as the trainer adapts it
(LoRA injected; for QLoRA its linear layers swapped for 4-bit ones first), so parameter counts and weight
bytes are exact. It is then re-materialized as fake CPU tensors (shapes and dtypes, no storage): meta
tensors bypass CPU autocast, fake CPU tensors do not, so the bf16 casts of a training step appear as they
do in the trainer. Two forwards run on them:

- training: the calls `causal_lm_loss` makes, on left-padded rows whose last `loss_tokens` positions carry
  the loss. `activations` is every distinct non-weight storage autograd keeps for backward, without the
  activation outputs the trainer does not keep (saved_activations.py).
- evaluation: one batch of EVAL_BATCH prompts without gradients in fp32, as the job's merged-model check
  runs after training. `evaluation` is the most memory its tensors hold at once (the KV cache included).

The rest is measured on the process, not derived from the model: `runtime`, this very process's resident
memory once torch, transformers, lorakit and the model's code are imported (the training process carries
the same), and `overhead`: what the job keeps beside the model (JOB_EXTRAS) and what the C allocator keeps
around training steps (HEAP_SLACK).
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..config import LoraConfig
from ..errors import LorakitError
from ..inject import inject
from ..models import load_config
from .estimate_constants import EVAL_BATCH, HEAP_SLACK, JOB_EXTRAS
from .loop import amp_dtype
from .objectives import IGNORE_INDEX, tail_logits
from .saved_activations import lean_saved_activations

METHODS = ("lora", "qlora", "full")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training process needs, by what holds them; `trainable`/`parameters` are counts."""

    method: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    evaluation: int
    overhead: int
    runtime: int
    trainable: int
    parameters: int

    @property
    def total(self) -> int:
        """Peak: evaluation after training runs on top of the heap the training steps left resident."""
        return (self.weights + self.gradients + self.optimizer + self.activations + self.evaluation
                + self.overhead + self.runtime)


def estimate(
    source: str | os.PathLike = "default",
    method: str = "lora",
    r: int = 8,
    target: list[str] | str | None = None,
    batch_size: int = 16,
    seq_len: int = 48,
    precision: str = "auto",
    loss_tokens: int = 2,
) -> MemoryEstimate:
    """Memory to train `source` on CPU with `method` ("lora", "qlora" or "full").

    `seq_len` is the padded length of the longest batch, `loss_tokens` how many trailing tokens of each
    row carry the loss (the trainer computes logits for those only), `precision` as the trainer's.
    """
    _check(method, batch_size, seq_len, loss_tokens)
    model = _causal_lm_on_meta(load_config(source))
    runtime = _resident_bytes()
    parameters = sum(p.numel() for p in _unique(model.parameters()))
    _adapt(model, method, r, target)
    trainable = _unique(p for p in model.parameters() if p.requires_grad)
    weights = _nbytes(_unique([*model.parameters(), *model.buffers()]))
    grads = _nbytes(trainable)
    transient = _dequant_transient(model)
    saved, evaluation = _forward_bytes(model, batch_size, seq_len, loss_tokens,
                                       amp_dtype(precision, torch.device("cpu")))
    return MemoryEstimate(
        method=method,
        weights=weights,
        gradients=grads,
        optimizer=2 * grads,  # AdamW: exp_avg and exp_avg_sq, each the size and dtype of its parameter
        activations=saved,
        evaluation=evaluation,
        overhead=int(HEAP_SLACK * saved) + transient + JOB_EXTRAS,
        runtime=runtime,
        trainable=sum(p.numel() for p in trainable),
        parameters=parameters,
    )


def _check(method: str, batch_size: int, seq_len: int, loss_tokens: int) -> None:
    if method not in METHODS:
        raise LorakitError(f"method must be one of {METHODS}, got {method!r}")
    if batch_size < 1 or not 0 < loss_tokens < seq_len:
        raise LorakitError(f"need batch_size >= 1 and 0 < loss_tokens < seq_len, got batch_size={batch_size}, "
                           f"loss_tokens={loss_tokens}, seq_len={seq_len}")


def _causal_lm_on_meta(config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # the trainer loads in fp32


def _adapt(model: nn.Module, method: str, r: int, target: list[str] | str | None) -> None:
    """Prepare the model for `method` in place, the way the trainer does (full: everything trains)."""
    if method == "full":
        model.requires_grad_(True)
        return
    if method == "qlora":
        _quantize_on_meta(model)
    inject(model, LoraConfig(r=r, alpha=2 * r, target_modules=target))


def _quantize_on_meta(model: nn.Module) -> None:
    """Swap the layers `quantize_model` would quantize for empty nf4 Linear4bit layers (exact sizes, no
    data); the compute dtype is fp32, as the trainer picks on CPU."""
    from ..module_tree import replace_module
    from ..quant.linear4bit import Linear4bit, linear_weight
    from ..quant.model import linear_names

    for name in linear_names(model, ["lm_head"]):
        linear = model.get_submodule(name)
        out_features, in_features = linear_weight(linear).shape  # GPT-2's Conv1D stores (in, out)
        replace_module(model, name, Linear4bit(in_features, out_features, linear.bias is not None,
                                               quant_type="nf4", compute_dtype=torch.float32, device="meta"))


def _dequant_transient(model: nn.Module) -> int:
    """A 4-bit layer rebuilds its dense weight inside forward and backward: the largest one is live at once."""
    from ..quant.linear4bit import Linear4bit

    sizes = [m.in_features * m.out_features * m.compute_dtype.itemsize for m in model.modules()
             if isinstance(m, Linear4bit)]
    return max(sizes, default=0)


def _forward_bytes(model: nn.Module, batch_size: int, seq_len: int, loss_tokens: int,
                   dtype: torch.dtype | None) -> tuple[int, int]:
    """(bytes a training forward saves for backward, peak bytes of an evaluation forward) of a meta model,
    which is left holding fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model.to_empty(device="cpu")
    with fake, _one_thread():
        saved = _saved_bytes(model, batch_size, seq_len, loss_tokens, dtype)
        prompts = _left_padded(EVAL_BATCH, seq_len)
        with torch.no_grad(), _LiveBytes() as live:
            tail_logits(model.eval(), *prompts, 1)
    return saved, live.peak


def _saved_bytes(model: nn.Module, batch_size: int, seq_len: int, loss_tokens: int,
                 dtype: torch.dtype | None) -> int:
    weights = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def record(tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if key not in weights:
            saved[key] = tensor.untyped_storage().nbytes()

    with lean_saved_activations(observe=record), \
            torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
        _training_loss(model.train(), batch_size, seq_len, loss_tokens)
    return sum(saved.values())


def _training_loss(model: nn.Module, batch_size: int, seq_len: int, loss_tokens: int) -> torch.Tensor:
    """The calls `causal_lm_loss` makes when the last `loss_tokens` columns are labelled (it reads that
    from the labels' values, which fake tensors do not hold)."""
    input_ids, mask = _left_padded(batch_size, seq_len)
    logits = tail_logits(model, input_ids, mask, loss_tokens + 1)[:, :-1]
    targets = torch.zeros(batch_size * loss_tokens, dtype=torch.long)
    return F.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _left_padded(batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of a batch whose rows but the first are left-padded, as collated."""
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    mask[1:, : seq_len // 4] = 0
    return torch.zeros(batch_size, seq_len, dtype=torch.long), mask


class _LiveBytes(TorchDispatchMode):
    """Peak bytes held at once by the tensors that ops under it create; a storage counts until the last
    tensor using it is gone, views included."""

    def __init__(self) -> None:
        super().__init__()
        self.users: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._hold(tensor)
        return out

    def _hold(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if key not in self.users:
            self.users[key], self.sizes[key] = 0, tensor.untyped_storage().nbytes()
            self.now += self.sizes[key]
            self.peak = max(self.peak, self.now)
        self.users[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.users[key] -= 1
        if not self.users[key]:
            del self.users[key]
            self.now -= self.sizes.pop(key)


@contextlib.contextmanager
def _one_thread():
    """4-bit layers share dequantization over Python threads, which would run outside the (thread-local)
    fake mode; with one torch thread they run on the caller's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors with shared ones (tied weights) once."""
    return list({id(t): t for t in tensors}.values())


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _storage_key(tensor: torch.Tensor) -> int:
    """Identity of the memory behind a tensor; fake and meta tensors have no data pointer but a storage."""
    return tensor.untyped_storage()._cdata


@functools.cache
def _resident_bytes() -> int:
    """Resident memory of this process when first asked (once the model's code is imported, before any
    estimating work, which leaves heap behind): the runtime a training process also carries."""
    import psutil

    return psutil.Process().memory_info().rss

