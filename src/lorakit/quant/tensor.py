"""QuantizedTensor: a 4-bit tensor with its statistics, and its bitsandbytes state-dict form."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from ..errors import FormatError, LorakitError
from .blockwise import dequantize_4bit, dequantize_8bit, quantize_4bit, quantize_8bit
from .codes import NESTED_BLOCKSIZE, QUANT_TYPES, code_table, dynamic_map

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"{key} names an unknown dtype {name!r}; the file is corrupt or not a bitsandbytes state")
    return dtype


@dataclass(frozen=True, eq=False, repr=False)
class QuantizedTensor:
    """Packed 4-bit codes plus what is needed to restore the tensor, in bitsandbytes' layout.

    `packed` holds two codes per byte (even element in the high nibble) over the row-major flattened
    tensor. `absmax` is the float32 maximum per block, or, with double quantization, its uint8 codes
    in `nested_quant_map` scaled per 256 blocks by `nested_absmax` around `nested_offset`.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    quant_type: str
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    nested_offset: float | None = None

    @classmethod
    def zeros(
        cls, shape: tuple[int, ...], quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ) -> QuantizedTensor:
        """An all-zero tensor in quantized form, without quantizing anything (a placeholder to load into)."""
        check_config(quant_type, blocksize)
        n = math.prod(shape)
        nblocks = -(-n // blocksize)
        device = device or "cpu"
        nested = {}
        if double_quant:
            nested = dict(
                nested_absmax=torch.zeros(-(-nblocks // NESTED_BLOCKSIZE), device=device),
                nested_quant_map=dynamic_map(device),
                nested_offset=0.0,
            )
        return cls(
            packed=torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device),
            absmax=torch.zeros(nblocks, dtype=torch.uint8 if double_quant else torch.float32, device=device),
            quant_map=code_table(quant_type, device),
            quant_type=quant_type,
            blocksize=blocksize,
            shape=torch.Size(shape),
            dtype=dtype,
            **nested,
        )

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def __repr__(self) -> str:
        return (f"QuantizedTensor({self.quant_type}, shape={list(self.shape)}, dtype={self.dtype}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, device={self.device}, "
                f"nbytes={self.nbytes})")

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: codes, statistics and code maps."""
        tensors = [self.packed, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def block_absmax(self) -> torch.Tensor:
        """float32 absmax per block, undoing the double quantization if there is one."""
        if not self.double_quant:
            return self.absmax.to(torch.float32)
        return dequantize_8bit(self.absmax, self.nested_absmax, self.nested_quant_map) + self.nested_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in its original shape, in `dtype` (default: the dtype it was quantized from)."""
        dtype = dtype or self.dtype
        if not dtype.is_floating_point:
            raise LorakitError(f"dequantize needs a floating dtype, got {dtype}; pass e.g. torch.bfloat16")
        flat = dequantize_4bit(self.packed, self.block_absmax(), self.quant_map, self.blocksize, self.numel(), dtype)
        return flat.view(self.shape)

    def to(self, device: torch.device | str, copy: bool = False) -> QuantizedTensor:
        """The same quantized tensor on another device (statistics keep their dtypes)."""
        move = lambda t: None if t is None else t.to(device, copy=copy)  # noqa: E731
        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            quant_map=move(self.quant_map),
            nested_absmax=move(self.nested_absmax),
            nested_quant_map=move(self.nested_quant_map),
        )

    def to_bnb(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """State-dict entries exactly as bitsandbytes' Linear4bit writes them for a parameter named `prefix`."""
        state = {
            prefix: self.packed.view(-1, 1),
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": self.quant_map,
        }
        meta: dict = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.double_quant:
            state[f"{prefix}.nested_absmax"] = self.nested_absmax
            state[f"{prefix}.nested_quant_map"] = self.nested_quant_map
            meta |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                     "nested_offset": self.nested_offset}
        blob = json.dumps(meta).encode("utf-8")
        state[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return state

    @classmethod
    def from_bnb(cls, state: Mapping[str, torch.Tensor], prefix: str = "weight") -> QuantizedTensor:
        """Read the entries bitsandbytes writes for a 4-bit parameter named `prefix` (see `to_bnb`)."""
        blob_keys = [f"{prefix}.quant_state.bitsandbytes__{q}" for q in QUANT_TYPES]
        found = [k for k in blob_keys if k in state]
        if len(found) != 1:
            raise FormatError(
                f"expected exactly one of {blob_keys} in the state dict, found {found or 'none'}; "
                "it is not a bitsandbytes 4-bit checkpoint or it was saved without its quantization state"
            )
        try:
            meta = json.loads(bytes(state[found[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FormatError(f"{found[0]} does not hold valid JSON ({err}); the checkpoint is corrupt") from err
        for key in ("quant_type", "blocksize", "dtype", "shape"):
            if key not in meta:
                raise FormatError(f"{found[0]} lacks {key!r}; the checkpoint is corrupt or from an unknown writer")
        nested = "nested_offset" in meta
        needed = [prefix, f"{prefix}.absmax", f"{prefix}.quant_map"]
        needed += [f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"] if nested else []
        for key in needed:
            if key not in state:
                raise FormatError(f"missing {key!r} in the state dict: a 4-bit weight needs all its statistics; "
                                  "save the whole state dict of the quantized model")
        quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
        if quant_type not in QUANT_TYPES or blocksize not in BLOCKSIZES:
            raise FormatError(f"{found[0]} has quant_type={quant_type!r}, blocksize={blocksize}; "
                              f"lorakit reads {QUANT_TYPES} with blocksize in {BLOCKSIZES}")
        if nested and int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
            raise FormatError(f"{found[0]} has nested_blocksize={meta['nested_blocksize']}; only 256 is supported")
        packed = state[prefix]
        packed = packed.contiguous().view(torch.uint8).reshape(-1)  # bitsandbytes may store bytes as another dtype
        qt = cls(
            packed=packed,
            absmax=state[f"{prefix}.absmax"],
            quant_map=state[f"{prefix}.quant_map"].to(torch.float32),
            quant_type=quant_type,
            blocksize=blocksize,
            shape=torch.Size(meta["shape"]),
            dtype=_dtype_from_name(meta["dtype"], found[0]),
            nested_absmax=state[f"{prefix}.nested_absmax"].to(torch.float32) if nested else None,
            nested_quant_map=state[f"{prefix}.nested_quant_map"].to(torch.float32) if nested else None,
            nested_offset=float(meta["nested_offset"]) if nested else None,
        )
        qt._check_sizes(prefix)
        return qt

    def _check_sizes(self, prefix: str) -> None:
        n = self.numel()
        nblocks = -(-n // self.blocksize)
        expected = {prefix: (n + 1) // 2, f"{prefix}.absmax": nblocks, f"{prefix}.quant_map": 16}
        actual = {prefix: self.packed.numel(), f"{prefix}.absmax": self.absmax.numel(),
                  f"{prefix}.quant_map": self.quant_map.numel()}
        if self.double_quant:
            expected |= {f"{prefix}.nested_absmax": -(-nblocks // NESTED_BLOCKSIZE), f"{prefix}.nested_quant_map": 256}
            actual |= {f"{prefix}.nested_absmax": self.nested_absmax.numel(),
                       f"{prefix}.nested_quant_map": self.nested_quant_map.numel()}
        for key, size in expected.items():
            if actual[key] != size:
                raise FormatError(f"{key} has {actual[key]} elements but shape {list(self.shape)} with blocksize "
                                  f"{self.blocksize} needs {size}; the statistics belong to another tensor")
        want_absmax = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want_absmax:
            raise FormatError(f"{prefix}.absmax is {self.absmax.dtype}, expected {want_absmax} "
                              f"({'with' if self.double_quant else 'without'} nested statistics)")


def check_config(quant_type: str, blocksize: int) -> None:
    """Reject a quantization type or block size that bitsandbytes cannot read."""
    if quant_type not in QUANT_TYPES:
        raise LorakitError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}; use 'nf4' (QLoRA's choice)")
    if blocksize not in BLOCKSIZES:
        raise LorakitError(f"blocksize {blocksize!r} is not supported; use one of {BLOCKSIZES} (64 is QLoRA's)")


def quantize(
    w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantizedTensor:
    """Quantize a float tensor to 4-bit NF4 or FP4, byte-identical to bitsandbytes' `quantize_4bit` on CPU;
    on CUDA the nested absmax follow its CUDA kernel's rounding instead (quantize_8bit says why).

    With `double_quant`, the per-block absmax are themselves quantized to 8 bits in blocks of 256 around
    their mean (QLoRA's double quantization), saving about 0.37 bits per weight at blocksize 64.
    """
    if not isinstance(w, torch.Tensor):
        raise LorakitError(f"quantize expects a torch.Tensor, got {type(w).__name__}")
    check_config(quant_type, blocksize)
    if w.dtype not in INPUT_DTYPES:
        raise LorakitError(
            f"quantize needs a float32, bfloat16 or float16 tensor, got {w.dtype}; convert it first, e.g. w.float()"
        )
    if w.is_meta:
        raise LorakitError("cannot quantize a tensor on the meta device; load the real weights first")
    if w.numel() == 0:
        raise LorakitError(f"cannot quantize an empty tensor (shape {list(w.shape)}); pass a tensor with elements")
    w = w.detach()
    packed, absmax = quantize_4bit(w.contiguous().view(-1), quant_type, blocksize)
    nested = {}
    if double_quant:
        offset = absmax.mean()
        codes, nested_absmax = quantize_8bit(absmax - offset)
        nested = dict(
            nested_absmax=nested_absmax,
            nested_quant_map=dynamic_map(w.device),
            nested_offset=float(offset),
        )
        absmax = codes
    return QuantizedTensor(
        packed=packed,
        absmax=absmax,
        quant_map=code_table(quant_type, w.device),
        quant_type=quant_type,
        blocksize=blocksize,
        shape=w.shape,
        dtype=w.dtype,
        **nested,
    )
