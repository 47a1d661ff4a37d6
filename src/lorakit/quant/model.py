"""Whole-model quantization: nn.Linear -> Linear4bit in place, back again, and what it saved."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LorakitError
from ..module_tree import name_matches, replace_module
from .embedding import QuantTable, dequantize_embeddings, embedding_pair, quantize_embeddings
from .linear4bit import Linear4bit, linear_weight
from .tensor import check_config

logger = logging.getLogger("lorakit.quant")


@dataclass(frozen=True)
class QuantReport:
    """Memory of a model's parameters and buffers before and after 4-bit quantization."""

    layers: int  # Linear4bit modules in the model
    dense_bytes: int  # what their weights took in their original dtype
    quantized_bytes: int  # what their codes and statistics take
    model_bytes: int  # whole model now (parameters and buffers, shared tensors counted once)
    tables: int = 0  # quantized embedding / output-head tables (a tied pair is one table), counted in the bytes

    @property
    def model_bytes_before(self) -> int:
        return self.model_bytes - self.quantized_bytes + self.dense_bytes

    def __str__(self) -> str:
        mib = 2**20
        tables = f" and {self.tables} embedding table{'s' * (self.tables > 1)} quantized" if self.tables else ""
        return (f"{self.layers} linear layers in 4 bits{tables}: model {self.model_bytes_before / mib:.1f} MiB -> "
                f"{self.model_bytes / mib:.1f} MiB (those weights {self.dense_bytes / mib:.1f} MiB -> "
                f"{self.quantized_bytes / mib:.1f} MiB)")


def quantization_report(model: nn.Module) -> QuantReport:
    """Count the model's memory now and what its Linear4bit weights and quantized tables took before."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    tables = [m for m in model.modules() if isinstance(m, QuantTable) and m.owns_table]
    dense = sum(m.quantized_numel * m.weight_dtype.itemsize for m in [*layers, *tables])
    quantized = sum(m.quantized_weight.nbytes for m in layers) + sum(m.nbytes for m in tables)
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.data_ptr() or id(tensor)  # shared storage counted once; meta tensors have no pointer
        seen[key] = max(seen.get(key, 0), tensor.numel() * tensor.element_size())
    return QuantReport(len(layers), dense, quantized, sum(seen.values()), len(tables))


def linear_names(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the layers `quantize_model` converts: nn.Linear and transformers Conv1D, minus the skipped,
    the output head, MultiheadAttention's projection and tied weights."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    owners = {id(child): parent for parent in model.modules() for child in parent.children()}
    names = []
    for name, module in model.named_modules():
        if linear_weight(module) is None or name_matches(skip, name) or module is head:
            continue
        if isinstance(owners.get(id(module)), nn.MultiheadAttention):
            continue  # MultiheadAttention reads out_proj.weight directly, never calls the module
        if uses[id(module.weight)] > 1:
            logger.info("lorakit: keeping %s dense: its weight is tied to another module", name)
            continue
        names.append(name)
    return names


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: list[str] | tuple[str, ...] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
    embeddings: str | None = None,
) -> nn.Module:
    """Replace the model's nn.Linear layers (and transformers' Conv1D, as the nn.Linear it computes) with
    Linear4bit in place and return the model.

    `skip` holds module names (exact or dotted suffix) to keep dense; the output head
    (`model.get_output_embeddings()`) and weights tied to other modules always stay dense.
    Layers are converted one at a time, each dense weight freed as soon as nothing else holds it. What stays
    dense and lives in memory torch does not own (a view of a mapped safetensors file) is copied, so the
    file's mapping, and every page of it the quantization read, goes with the dense weights.
    `embeddings` ("int8" row-wise, "nf4" or "fp4" blockwise; default None: dense) also stores the input
    embeddings and the output head quantized (quant/embedding.py); a head tied to the embeddings stays tied.
    See `quantization_report(model)` for the memory saved (also logged at INFO).
    """
    check_config(quant_type, blocksize)
    if isinstance(skip, str):
        skip = [skip]
    if isinstance(model, nn.Linear):
        raise LorakitError("quantize_model replaces layers inside a model; for a single nn.Linear use "
                           "Linear4bit.from_linear(linear)")
    if embeddings is not None:
        embedding_pair(model, embeddings, blocksize)  # every check before any layer changes
    names = linear_names(model, list(skip))
    for name in names:
        try:
            layer = Linear4bit.from_linear(model.get_submodule(name), quant_type, compute_dtype, blocksize,
                                           double_quant)
        except LorakitError as err:
            raise LorakitError(f"cannot quantize {name}: {err}") from err
        replace_module(model, name, layer)
    if embeddings is not None:
        quantize_embeddings(model, embeddings, blocksize, double_quant)
    copied = _own_borrowed_tensors(model)
    if copied:
        logger.info("lorakit: copied %d dense tensors out of the loaded file's mapping", copied)
    logger.info("lorakit: %s", quantization_report(model))
    return model


def _own_borrowed_tensors(model: nn.Module) -> int:
    """Copy every parameter and buffer whose storage torch did not allocate (a view of an mmap'd file, a
    NumPy array) into memory it does; return how many. from_pretrained leaves each weight a view of the
    safetensors file's mapping, which is unmapped only when the last view goes: one norm weight keeps the
    whole file resident after its linear weights were quantized (540 MB for the default model)."""
    copied = 0
    with torch.no_grad():
        for param in model.parameters():  # yields a tied weight once
            if not _owned(param):
                param.data = param.data.clone()
                copied += 1
        buffer_copies: dict[int, torch.Tensor] = {}  # a buffer registered in two modules stays one tensor
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and not _owned(buffer):
                    if id(buffer) not in buffer_copies:
                        buffer_copies[id(buffer)] = buffer.clone()
                    module._buffers[name] = buffer_copies[id(buffer)]
    return copied + len(buffer_copies)


def _owned(tensor: torch.Tensor) -> bool:
    """Whether torch's allocator made the storage: views of memory it borrowed cannot be resized."""
    return tensor.device.type == "meta" or tensor.untyped_storage().resizable()


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every Linear4bit with an nn.Linear holding its dequantized weight (in `dtype`, default the
    dtype it was quantized from; the weight stays frozen) in place, and return the model. A quantized
    GPT-2 Conv1D comes back as the nn.Linear it computes; quantized embeddings and head come back as
    nn.Embedding and nn.Linear, tied again if they were."""
    if isinstance(model, Linear4bit):
        raise LorakitError("dequantize_model replaces layers inside a model; for one layer use layer.to_linear()")
    names = [name for name, module in model.named_modules() if isinstance(module, Linear4bit)]
    for name in names:
        replace_module(model, name, model.get_submodule(name).to_linear(dtype))
    return dequantize_embeddings(model, dtype)
