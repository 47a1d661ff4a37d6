"""`lorakit merge --format gguf`: a merged Llama model as one GGUF file that llama.cpp (and transformers) load.

The architecture keys (llama.*) come from the model's config; the tokenizer (tokenizer.*) and the model card
(general.*) are copied from a GGUF file, normally the one the base was loaded from (the embedded default is
one), because building a llama.cpp vocabulary from a Hugging Face tokenizer is llama.cpp's own converter's
job. Matrices are written as float32, float16 or bfloat16; norms and biases stay float32 as llama.cpp's
converter keeps them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError
from .gguf_layout import LlamaLayout, gguf_array, write_gguf

COPIED_PREFIXES = ("general.", "tokenizer.")
NOT_COPIED = ("general.architecture", "general.type", "general.file_type", "general.quantization_version")
FILE_TYPES = {torch.float32: "ALL_F32", torch.float16: "MOSTLY_F16", torch.bfloat16: "MOSTLY_BF16"}


def merged_to_gguf(model: nn.Module, out: str | os.PathLike, metadata_from: str | os.PathLike,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write a plain (merged, lorakit-free) Llama model to `out` (.gguf), tokenizer taken from `metadata_from`."""
    import gguf

    if dtype not in FILE_TYPES:
        raise LorakitError(f"a merged GGUF is written as float32, float16 or bfloat16, not {dtype}")
    layout = LlamaLayout(model.config)
    hparams = _hparams(model.config)
    tensors = _gguf_tensors(model, layout)
    reader = gguf.GGUFReader(metadata_from)
    if "tokenizer.ggml.model" not in reader.fields:
        raise LorakitError(f"{metadata_from} has no tokenizer (tokenizer.ggml.*); llama.cpp needs one in the file")

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        for key, field in reader.fields.items():
            if key.startswith(COPIED_PREFIXES) and key not in NOT_COPIED:
                main, sub = field.types[0], field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(key, field.contents(), main, sub_type=sub)
        for add, value in hparams:
            getattr(writer, add)(value)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, tensor in tensors.items():
            array, qtype = gguf_array(tensor, dtype if tensor.dim() > 1 else torch.float32)
            writer.add_tensor(name, array, raw_dtype=qtype)

    return write_gguf(out, layout.arch_name, fill)


def gguf_source(spec: str | os.PathLike) -> Path:
    """The GGUF file a base model spec was loaded from (its tokenizer goes into a merged GGUF)."""
    if str(spec) == "default":
        from ..assets import default_model_path

        return default_model_path()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise LorakitError(f"--format gguf copies the tokenizer from the base's GGUF file, and {spec} is not one; write "
                       "a Hugging Face folder (--format hf) and convert it with llama.cpp's convert_hf_to_gguf.py")


def _hparams(config: Any) -> list[tuple[str, Any]]:
    """The llama.* keys, from the config; configs this writer cannot describe exactly are refused."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise LorakitError(f"the base uses RoPE scaling ({rope_type}); the GGUF writer handles plain RoPE only: write "
                           "a Hugging Face folder (--format hf) and convert it with llama.cpp's convert_hf_to_gguf.py")
    theta = rope["rope_theta"] if "rope_theta" in rope else config.rope_theta
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return [
        ("add_context_length", config.max_position_embeddings),
        ("add_embedding_length", config.hidden_size),
        ("add_block_count", config.num_hidden_layers),
        ("add_feed_forward_length", config.intermediate_size),
        ("add_head_count", heads),
        ("add_head_count_kv", getattr(config, "num_key_value_heads", None) or heads),
        ("add_rope_freq_base", float(theta)),
        ("add_layer_norm_rms_eps", float(config.rms_norm_eps)),
        ("add_vocab_size", config.vocab_size),
        ("add_rope_dimension_count", head_dim),
        ("add_key_length", head_dim),
        ("add_value_length", head_dim),
    ]


def _gguf_tensors(model: nn.Module, layout: LlamaLayout) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor, q/k rows reordered; a tied head is stored once (llama.cpp reuses token_embd)."""
    lora_keys = [k for k in model.state_dict() if ".lora_" in k or ".base_layer." in k]
    if lora_keys:
        raise LorakitError(f"the model still holds LoRA layers ({lora_keys[0]}, ...); merge and unload them first "
                           "(lk.unload(model, merge=True))")
    tensors, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[layout.tensor_name(name)] = layout.to_gguf_rows(name, tensor.detach())
    return tensors
