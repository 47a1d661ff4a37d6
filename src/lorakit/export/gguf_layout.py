"""Where a Hugging Face Llama tensor goes in a llama.cpp GGUF file: its name, row order, and how GGUF files are written.

Names come from the gguf package's TensorNameMap (model.layers.3.self_attn.q_proj -> blk.3.attn_q.weight).
llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel) also reorders the rows of q_proj and k_proj inside
each head, from Hugging Face's rotate-half layout (first half of the head's dimensions, then the second) to
interleaved pairs; an adapter's lora_B rows (and a merged weight's rows) must follow the same order.
A 2-D tensor stored from an (rows, cols) array has GGUF dimensions ne = [cols, rows].
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import LorakitError

SUPPORTED_MODEL_TYPES = ("llama",)  # Hugging Face model_type values whose GGUF layout is written here
GGUF_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass
class LlamaLayout:
    """The GGUF names and row order of one Llama-architecture base."""

    config: Any  # the transformers config of the base

    def __post_init__(self) -> None:
        import gguf

        model_type = getattr(self.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise LorakitError(f"GGUF export writes Llama-architecture models ({SUPPORTED_MODEL_TYPES}); this base is "
                               f"{model_type!r}. For other architectures use llama.cpp's convert_lora_to_gguf.py / "
                               "convert_hf_to_gguf.py on the adapter folder or the merged folder (lorakit merge)")
        self.arch = gguf.MODEL_ARCH.LLAMA
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.arch]
        self.names = gguf.get_tensor_name_map(self.arch, self.config.num_hidden_layers)
        self.n_head = self.config.num_attention_heads
        self.n_head_kv = getattr(self.config, "num_key_value_heads", None) or self.n_head

    def tensor_name(self, hf_name: str) -> str:
        """'model.layers.0.self_attn.q_proj.weight' or the module name alone -> 'blk.0.attn_q.weight'."""
        name = hf_name if hf_name.endswith((".weight", ".bias")) else hf_name + ".weight"
        mapped = self.names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise LorakitError(f"{hf_name} has no tensor in llama.cpp's {self.arch_name} layout; only the modules "
                               "of a Llama model (attention, MLP, norms, embeddings, head) can be exported")
        return mapped

    def to_gguf_rows(self, hf_name: str, rows: Tensor) -> Tensor:
        """Reorder the output rows of q_proj / k_proj (weights, biases or lora_B) as llama.cpp's converter does."""
        if ".q_proj" in hf_name:
            return _interleave_heads(rows, self.n_head)
        if ".k_proj" in hf_name:
            return _interleave_heads(rows, self.n_head_kv)
        return rows


def _interleave_heads(rows: Tensor, heads: int) -> Tensor:
    """Per head, rows [x0..x(d/2-1), y0..y(d/2-1)] become [x0, y0, x1, y1, ...]."""
    head_dim = rows.shape[0] // heads
    return rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def gguf_array(tensor: Tensor, dtype: torch.dtype) -> tuple[np.ndarray, Any]:
    """(array, GGML type) for GGUFWriter.add_tensor; bf16 goes as raw bytes with its type, as the gguf package wants."""
    import gguf

    if dtype not in GGUF_TYPES:
        raise LorakitError(f"GGUF tensors are written as float32, float16 or bfloat16, not {dtype}")
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[dtype])
    array = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
    return gguf.quants.quantize(array, qtype), qtype


def write_gguf(out: str | os.PathLike, arch: str, fill: Callable[[Any], None]) -> Path:
    """Write a GGUF file atomically: `fill(writer)` adds keys and tensors; the file appears whole or not at all."""
    import gguf

    out = Path(out)
    if out.suffix != ".gguf":
        raise LorakitError(f"{out}: a GGUF output must be one file ending in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
