"""Quantized input embeddings and output head (opt-in): int8 row-wise or NF4/FP4 blockwise tables.

On a small model the vocabulary table is a large share of the bytes (28M of SmolLM2-135M's 135M
parameters), so a 4-bit base with a 16-bit table stays near half its 16-bit size. Here the table is
stored once, quantized: the embedding decodes only the rows it looks up, and the head multiplies by the
table a tile of rows at a time, so no 16-bit copy of the whole table exists at any moment. A head tied to
the embedding (the embedded default's) reads the embedding's storage and saves nothing of its own.

Storage, per module prefix (see docs/formats.md, "Quantized embeddings and output head"):
  int8 (row-wise, as bitsandbytes' LLM.int8 vectorwise quantization): `weight` int8 (rows, cols) =
      round(W * 127 / absmax_row), `SCB` float32 (rows,) = absmax_row.
  nf4 / fp4 (blockwise along each row): bitsandbytes' 4-bit layout (`weight`, `weight.absmax`,
      `weight.quant_map`, `weight.nested_*`, `weight.quant_state.bitsandbytes__<type>`); rows must be
      whole blocks, so lookups decode just their rows.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FormatError, LorakitError
from ..module_tree import replace_module
from .blockwise import dequantize_4bit
from .codes import NESTED_BLOCKSIZE, QUANT_TYPES
from .tensor import QuantizedTensor, quantize

TABLE_TYPES = ("int8", *QUANT_TYPES)
TILE_ELEMENTS = 1 << 22  # elements of the table the head decodes per tile (8 MiB in bf16)
_INV127 = 7.874015718698502e-3  # float32(1 / 127), the factor bitsandbytes' int8 dequantization uses
_BNB_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 absmax per row), byte-identical to bitsandbytes' `int8_vectorwise_quant` on the
    same float32 input; an all-zero row gets codes 0 (bitsandbytes would divide by zero there)."""
    w = w.detach().float()
    absmax = w.abs().amax(1)
    if not torch.isfinite(absmax).all():
        row = int((~torch.isfinite(absmax)).nonzero()[0, 0])
        raise LorakitError(f"row {row} of the table holds NaN or Inf; int8 quantization needs finite values")
    codes = torch.round(w * (127.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny))[:, None])
    return codes.to(torch.int8), absmax


class QuantTable(nn.Module):
    """A frozen (rows, cols) table stored quantized; subclasses decide what forward does with it."""

    def __init__(self, rows: int, cols: int, table_type: str, dtype: torch.dtype, blocksize: int = 64,
                 double_quant: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        check_table_config(table_type, cols, blocksize)
        self.rows, self.cols, self.table_type, self.weight_dtype = rows, cols, table_type, dtype
        if table_type == "int8":
            self._set_int8(torch.zeros(rows, cols, dtype=torch.int8, device=device),
                           torch.zeros(rows, device=device))
        else:
            self._set_4bit(QuantizedTensor.zeros((rows, cols), table_type, blocksize, double_quant, dtype, device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, table_type: str, blocksize: int, double_quant: bool) -> QuantTable:
        """A module of this class holding `weight` quantized (built on meta, so no dense copy is allocated)."""
        rows, cols = weight.shape
        module = cls(rows, cols, table_type, weight.dtype, blocksize, double_quant, device="meta")
        module.quantize_from(weight)
        return module

    def quantize_from(self, weight: torch.Tensor) -> None:
        """Fill the table from a dense (rows, cols) weight, on that weight's device."""
        if self.table_type == "int8":
            self._set_int8(*quantize_rows_int8(weight))
        else:
            self._set_4bit(quantize(weight.detach(), self.table_type, self.blocksize, self.double_quant))

    def _set_int8(self, codes: torch.Tensor, absmax: torch.Tensor) -> None:
        self.register_buffer("weight", codes, persistent=False)
        self.register_buffer("SCB", absmax.float(), persistent=False)

    def _set_4bit(self, qt: QuantizedTensor) -> None:
        self.blocksize, self.nested_offset = qt.blocksize, qt.nested_offset
        self.register_buffer("weight", qt.packed.view(-1, 1), persistent=False)
        for name in _BNB_4BIT:
            self.register_buffer(name, getattr(qt, name), persistent=False)

    @property
    def double_quant(self) -> bool:
        return getattr(self, "nested_absmax", None) is not None

    @property
    def quantized_weight(self) -> QuantizedTensor:
        """The 4-bit table as a QuantizedTensor sharing this module's buffers (nf4/fp4 tables only)."""
        shape = torch.Size((self.rows, self.cols))
        return QuantizedTensor(self.weight.view(-1), self.absmax, self.quant_map, self.table_type, self.blocksize,
                               shape, self.weight_dtype, self._buffers.get("nested_absmax"),
                               self._buffers.get("nested_quant_map"), self.nested_offset)

    @property
    def owns_table(self) -> bool:
        """False for a head that reads a tied embedding's table instead of storing one."""
        return getattr(self, "table", self) is self

    @property
    def quantized_numel(self) -> int:
        """Elements of the dense table stored here (lk.count_parameters counts them); none if not owned."""
        return self.rows * self.cols if self.owns_table else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole dense (rows, cols) table, in `dtype` (default: the dtype it was quantized from)."""
        return self.decode_rows(0, self.rows, dtype or self.weight_dtype)

    def decode_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows start..end-1, dense, bit-identical to the same rows of `dequantize_weight(dtype)`."""
        if self.table_type == "int8":
            return (self.weight[start:end].float() * self.SCB[start:end, None]).mul_(_INV127).to(dtype)
        per_row = self.cols // self.blocksize
        blocks = torch.arange(start * per_row, end * per_row, device=self.weight.device)
        flat = dequantize_4bit(self.weight.view(-1)[start * self.cols // 2: end * self.cols // 2],
                               self._block_absmax(blocks), self.quant_map, self.blocksize,
                               (end - start) * self.cols, dtype)
        return flat.view(end - start, self.cols)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` (any shape) decoded: shape (*ids.shape, cols)."""
        flat = ids.reshape(-1)
        if self.table_type == "int8":
            rows = (self.weight[flat].float() * self.SCB[flat, None]).mul_(_INV127).to(dtype)
        else:
            per_row, half = self.cols // self.blocksize, self.cols // 2
            blocks = (flat[:, None] * per_row + torch.arange(per_row, device=flat.device)).reshape(-1)
            packed = self.weight.view(self.rows, half)[flat].reshape(-1)
            rows = dequantize_4bit(packed, self._block_absmax(blocks), self.quant_map, self.blocksize,
                                   flat.numel() * self.cols, dtype)
        return rows.view(*ids.shape, self.cols)

    def _block_absmax(self, blocks: torch.Tensor) -> torch.Tensor:
        """float32 absmax of the given blocks, with the same float32 operations as QuantizedTensor.block_absmax."""
        if not self.double_quant:
            return self.absmax[blocks]
        codes = self.absmax[blocks].to(torch.int32)
        values = torch.index_select(self.nested_quant_map.float(), 0, codes.view(-1))
        return values.mul_(self.nested_absmax[blocks // NESTED_BLOCKSIZE]) + self.nested_offset

    def _apply(self, fn, recurse=True):
        # Statistics stay float32: model.to(torch.bfloat16) may move them but must not round them.
        before = {n: t for n, t in self._buffers.items() if t is not None and t.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in before.items():
            if self._buffers[name].dtype != old.dtype:
                self._buffers[name] = old.to(self._buffers[name].device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # parameters (a head's bias)
        for key, value in self._table_state(prefix).items():
            destination[key] = value if keep_vars else value.detach()

    def _table_state(self, prefix: str) -> dict[str, torch.Tensor]:
        if self.table_type == "int8":
            return {prefix + "weight": self.weight, prefix + "SCB": self.SCB}
        return self.quantized_weight.to_bnb(prefix + "weight")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = set(self._table_state(prefix))
        if prefix + "weight" in state_dict:
            self._load_table(state_dict, prefix)
        else:
            missing_keys.extend(sorted(own))
        own |= {f"{prefix}weight.quant_state.bitsandbytes__{q}" for q in QUANT_TYPES}
        rest = {key: value for key, value in state_dict.items() if key not in own}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _load_table(self, state_dict, prefix: str) -> None:
        """Read this module's table entries exactly, or raise with the module left as it was."""
        weight, device = state_dict[prefix + "weight"], self.weight.device
        if self.table_type == "int8":
            scb = state_dict.get(prefix + "SCB")
            if weight.dtype != torch.int8 or tuple(weight.shape) != (self.rows, self.cols) or scb is None \
                    or tuple(scb.shape) != (self.rows,):
                raise FormatError(f"{prefix}weight is not an int8 ({self.rows}, {self.cols}) table with "
                                  f"{prefix}SCB beside it; it was saved with another embeddings= setting")
            self._set_int8(weight.to(device, copy=True), scb.to(device, torch.float32, copy=True))
            return
        qt = QuantizedTensor.from_bnb(state_dict, prefix + "weight")
        if (qt.quant_type, tuple(qt.shape), qt.dtype) != (self.table_type, (self.rows, self.cols), self.weight_dtype):
            raise FormatError(f"{prefix}weight holds a {qt.quant_type} table of shape {list(qt.shape)} ({qt.dtype}); "
                              f"this module is {self.table_type} ({self.rows}, {self.cols}) ({self.weight_dtype})")
        check_table_config(qt.quant_type, self.cols, qt.blocksize)
        self._set_4bit(qt.to(device, copy=True))

    def _table_repr(self) -> str:
        detail = "row-wise" if self.table_type == "int8" else f"blocksize={self.blocksize}, " \
                 f"double_quant={self.double_quant}"
        return f"{self.rows}, {self.cols}, {self.table_type} {detail}, dtype={self.weight_dtype}"


def check_table_config(table_type: str, cols: int, blocksize: int) -> None:
    if table_type not in TABLE_TYPES:
        raise LorakitError(f"embeddings must be one of {TABLE_TYPES} or None, got {table_type!r}")
    if table_type != "int8" and cols % blocksize:
        raise LorakitError(f"a {table_type} table needs rows of whole blocks, but rows have {cols} values and "
                           f"blocksize is {blocksize}; use embeddings='int8' or a blocksize dividing {cols}")


class QuantEmbedding(QuantTable):
    """nn.Embedding over a quantized table: a lookup decodes only the rows it returns (frozen, no gradient)."""

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, table_type: str, blocksize: int = 64,
                       double_quant: bool = True) -> QuantEmbedding:
        module = cls.from_weight(embedding.weight, table_type, blocksize, double_quant)
        module.padding_idx = embedding.padding_idx
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids, self.weight_dtype)

    def to_embedding(self, dtype: torch.dtype | None = None) -> nn.Embedding:
        """A frozen nn.Embedding holding the dequantized table."""
        weight = self.dequantize_weight(dtype)
        embedding = nn.Embedding(self.rows, self.cols, padding_idx=getattr(self, "padding_idx", None),
                                 device="meta", dtype=weight.dtype)
        embedding.weight = nn.Parameter(weight, requires_grad=False)
        return embedding

    def extra_repr(self) -> str:
        return self._table_repr()


class _TiledHead(torch.autograd.Function):
    """x @ Wᵀ (+ b) with W decoded a tile of rows at a time, in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, bias, table):
        ctx.table = table
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype  # as F.linear
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        out = torch.empty(x2.shape[0], table.rows, dtype=dtype, device=x.device)
        for start, end in _tiles(table):
            out[:, start:end] = x2 @ table.decode_rows(start, end, dtype).T
        if bias is not None:
            out += bias.to(dtype)
        return out.view(*x.shape[:-1], table.rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        table, grad_x, grad_bias = ctx.table, None, None
        grad2 = grad_out.reshape(-1, table.rows)
        if ctx.needs_input_grad[0]:
            acc = torch.zeros(grad2.shape[0], table.cols, dtype=torch.float32, device=grad_out.device)
            for start, end in _tiles(table):
                acc += grad2[:, start:end] @ table.decode_rows(start, end, grad_out.dtype)
            grad_x = acc.to(grad_out.dtype).view(*grad_out.shape[:-1], table.cols)
        if ctx.needs_input_grad[1]:
            grad_bias = grad2.sum(0)
        return grad_x, grad_bias, None


def _tiles(table: QuantTable) -> list[tuple[int, int]]:
    step = max(1, TILE_ELEMENTS // table.cols)
    return [(start, min(start + step, table.rows)) for start in range(0, table.rows, step)]


class QuantHead(QuantTable):
    """The output head (x @ Wᵀ + b) over a quantized table, decoded in tiles so no whole 16-bit W exists.

    Tied (`QuantHead.tied(embedding)`): it reads the QuantEmbedding's table and stores nothing, so the
    state dict holds the table once, under the embedding's name, and the two can never disagree.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, table_type: str, blocksize: int = 64,
                    double_quant: bool = True) -> QuantHead:
        module = cls.from_weight(linear.weight, table_type, blocksize, double_quant)
        module.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                    requires_grad=linear.bias.requires_grad)
        return module

    @classmethod
    def tied(cls, embedding: QuantEmbedding) -> QuantHead:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.bias = None
        object.__setattr__(module, "_tied_to", (embedding,))  # a reference, not a child: no second copy in state
        return module

    @property
    def table(self) -> QuantTable:
        tied = self.__dict__.get("_tied_to")
        return tied[0] if tied else self

    def __getattr__(self, name: str):
        tied = self.__dict__.get("_tied_to")
        if tied and name in ("rows", "cols", "table_type", "weight_dtype"):
            return getattr(tied[0], name)  # in_features etc. of a tied head are the embedding's
        return super().__getattr__(name)

    @property
    def in_features(self) -> int:
        return self.table.cols

    @property
    def out_features(self) -> int:
        return self.table.rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TiledHead.apply(x, self.bias, self.table)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        table = self.table
        return table.decode_rows(0, table.rows, dtype or table.weight_dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A frozen nn.Linear holding the dequantized table (an untied copy, for a tied head too)."""
        weight = self.dequantize_weight(dtype)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=self.bias is not None, device="meta",
                           dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(weight.dtype, copy=True), self.bias.requires_grad)
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.table is self:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        else:
            nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.table is self:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        else:
            nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                            unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return "tied to the input embeddings" if self.table is not self else self._table_repr()


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, module in model.named_modules():
        if module is old:
            replace_module(model, name, new)
            return
    raise LorakitError(f"{type(old).__name__} is not a submodule of the model")


def embedding_pair(model: nn.Module, table_type: str, blocksize: int) -> tuple[nn.Embedding, nn.Linear | None]:
    """The model's input embeddings and output head (None if it has none), once every check that
    `quantize_embeddings` needs has passed, so a refusal leaves the model untouched."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not callable(get_in):
        raise LorakitError(f"{type(model).__name__} has no get_input_embeddings(); embeddings= needs a "
                           "transformers-style model (pass embeddings=None)")
    embedding = get_in()
    head = get_out() if callable(get_out) else None
    if isinstance(embedding, QuantEmbedding) or isinstance(head, QuantHead):
        raise LorakitError("the embeddings are quantized already")
    if type(embedding) is not nn.Embedding:
        raise LorakitError(f"the input embeddings are a {type(embedding).__name__}, which computes more than a "
                           "table lookup; only a plain torch.nn.Embedding can be quantized (pass embeddings=None)")
    if embedding.max_norm is not None:
        raise LorakitError("an nn.Embedding with max_norm rewrites its table on lookup; it cannot be quantized")
    if head is not None and not isinstance(head, nn.Linear):
        raise LorakitError(f"the output head is a {type(head).__name__}, not an nn.Linear; it cannot be quantized")
    check_table_config(table_type, embedding.embedding_dim, blocksize)
    if head is not None:
        check_table_config(table_type, head.in_features, blocksize)
    return embedding, head


def quantize_embeddings(model: nn.Module, table_type: str, blocksize: int = 64,
                        double_quant: bool = True) -> nn.Module:
    """Store the model's input embeddings and output head quantized, in place; a tied pair stays tied.

    Uses `model.get_input_embeddings()` / `get_output_embeddings()` (transformers' models have both).
    """
    embedding, head = embedding_pair(model, table_type, blocksize)
    quantized = QuantEmbedding.from_embedding(embedding, table_type, blocksize, double_quant)
    if head is not None:
        tied = head.weight is embedding.weight
        _replace(model, head, QuantHead.tied(quantized) if tied else
                 QuantHead.from_linear(head, table_type, blocksize, double_quant))
    _replace(model, embedding, quantized)
    return model


def dequantize_embeddings(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Undo `quantize_embeddings` in place: dense nn.Embedding and nn.Linear head, tied again if they were."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantEmbedding, QuantHead))]
    dense: dict[int, nn.Module] = {}
    for _, module in found:
        if isinstance(module, QuantEmbedding):
            dense[id(module)] = module.to_embedding(dtype)
    for name, module in found:
        if isinstance(module, QuantHead):
            tied = dense.get(id(module.table))
            new = module.to_linear(dtype)
            if tied is not None:
                new.weight = tied.weight
            dense[id(module)] = new
    for name, module in found:
        replace_module(model, name, dense[id(module)])
    return model

