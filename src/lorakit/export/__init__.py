"""Adapters and merged models for other engines: vLLM adapter folders, llama.cpp GGUF adapters and models."""

from .scaled import ExportRefused
from .vllm import VllmExport, to_vllm

__all__ = ["ExportRefused", "VllmExport", "to_vllm"]
