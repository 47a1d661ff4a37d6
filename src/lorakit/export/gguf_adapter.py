"""`lorakit export --format gguf`: an adapter as llama.cpp's LoRA-adapter GGUF (what `llama-cli --lora` loads).

The layout is the one llama.cpp's convert_lora_to_gguf.py writes and src/llama-adapter.cpp reads:
general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (float32), general.architecture of the
base; for every adapted base tensor `<name>` (e.g. blk.0.attn_q.weight) a pair `<name>.lora_a` with
ne = [in, r] (the (r, in) A) and `<name>.lora_b` with ne = [r, out] (the (out, r) B, rows in llama.cpp's q/k
order); token_embd's lora_a is stored transposed, ne = [r, n_vocab]. llama.cpp scales each pair by
alpha / r with r = the pair's own rank (ne[0] of lora_b) and one alpha for the file. The file keeps every
module's own rank (llama.cpp computes at the real rank, so padding would cost time), takes the adapter's
lora_alpha as its alpha, and stores lora_b = scaling·B·r/alpha: llama.cpp's alpha/r then restores exactly
PEFT's per-module scaling (rank_pattern, alpha_pattern, rsLoRA), and a plain adapter's B is stored as it is.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter_files import save
from ..errors import LorakitError
from .gguf_layout import LlamaLayout, gguf_array, write_gguf
from .scaled import ExportRefused, ScaledAdapter, read_scaled


@dataclass
class GgufAdapterExport:
    out: Path
    rank: int  # the largest rank of any pair (each keeps its own)
    alpha: float
    tensors: dict[str, str]  # GGUF base tensor name -> the Hugging Face module it adapts


def to_gguf(folder_or_model: str | os.PathLike | nn.Module, out: str | os.PathLike, base: Any = "default",
            adapter: str = "default", dtype: torch.dtype = torch.float32) -> GgufAdapterExport:
    """Write the adapter as one llama.cpp LoRA GGUF file for the base model `base`.

    `folder_or_model` is an adapter folder or a model holding lorakit adapter `adapter`; `base` is the base
    model (a transformers model, or what lorakit.models.load_base_model takes: "default", a folder, a .gguf),
    needed for its architecture, head counts and shapes. For a model, `base` defaults to the model itself.
    """
    if isinstance(folder_or_model, nn.Module):
        with tempfile.TemporaryDirectory() as tmp:
            save(folder_or_model, tmp, adapter=adapter)
            base_model = folder_or_model if base == "default" else _base_model(base)
            return _export(read_scaled(tmp, "llama.cpp"), base_model, Path(out), dtype, title=adapter)
    adapter_file = read_scaled(folder_or_model, "llama.cpp")
    return _export(adapter_file, _base_model(base), Path(out), dtype, title=adapter_file.folder.name)


def _base_model(base: Any) -> nn.Module:
    if isinstance(base, nn.Module):
        return base
    from ..models import load_base_model

    return load_base_model(base)[0]


def _export(adapter: ScaledAdapter, base: nn.Module, out: Path, dtype: torch.dtype, title: str) -> GgufAdapterExport:
    layout = LlamaLayout(base.config)
    alpha = float(adapter.config["lora_alpha"])
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    modules = dict(base.named_modules())
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in adapter.pairs.items():
        name = layout.tensor_name(module)
        if tied and name.startswith(("token_embd.", "output.")):
            raise ExportRefused(f"{adapter.folder}: {module} is adapted, but this base ties its input embedding and "
                                "output head into one GGUF tensor (token_embd.weight), where llama.cpp would apply "
                                "the pair to both uses; merge the adapter instead (lorakit merge --format gguf)")
        _check_shape(adapter.folder, module, modules.get(module), pair.A, pair.B)
        A = pair.A.T if name.startswith("token_embd.") else pair.A
        B = pair.B * (pair.A.shape[0] / alpha)  # llama.cpp multiplies by alpha / rank
        tensors[name] = (A, layout.to_gguf_rows(module, B))

    def fill(writer) -> None:
        import gguf

        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_string(gguf.Keys.General.NAME, title)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, (A, B) in tensors.items():
            for suffix, tensor in (("lora_a", A), ("lora_b", B)):
                array, qtype = gguf_array(tensor, dtype)
                writer.add_tensor(f"{name}.{suffix}", array, raw_dtype=qtype)

    write_gguf(out, layout.arch_name, fill)
    return GgufAdapterExport(out, adapter.rank, alpha, {layout.tensor_name(m): m for m in adapter.pairs})


def _check_shape(folder: Path, module: str, layer: nn.Module | None, A: torch.Tensor, B: torch.Tensor) -> None:
    weight = getattr(layer, "weight", None)
    if weight is None:
        raise LorakitError(f"{folder}: {module} is not a module of the base model; was it trained for another base?")
    want = (weight.shape[1], weight.shape[0]) if isinstance(layer, nn.Embedding) else (weight.shape[0], weight.shape[1])
    if (B.shape[0], A.shape[1]) != want:
        raise LorakitError(f"{folder}: {module} updates a ({B.shape[0]} x {A.shape[1]}) weight but the base's is "
                           f"({want[0]} x {want[1]}); was it trained for another base?")
