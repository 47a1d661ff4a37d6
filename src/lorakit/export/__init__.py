"""Adapters and merged models for other engines: vLLM adapter folders, llama.cpp GGUF adapters and models."""

from .gguf_adapter import GgufAdapterExport, to_gguf
from .gguf_model import gguf_source, merged_to_gguf
from .scaled import ExportRefused
from .vllm import VllmExport, to_vllm

__all__ = ["ExportRefused", "GgufAdapterExport", "VllmExport", "gguf_source", "merged_to_gguf", "to_gguf", "to_vllm"]
