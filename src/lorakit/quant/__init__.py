"""4-bit NF4/FP4 quantization in bitsandbytes' format, in plain PyTorch: tensors, Linear4bit, whole models
(optionally their embeddings and output head too)."""

from .embedding import QuantEmbedding, QuantHead, quantize_embeddings
from .linear4bit import Linear4bit
from .merge import LayerMerge, MergeReport, merge_into_4bit
from .model import QuantReport, dequantize_model, quantization_report, quantize_model
from .tensor import QuantizedTensor, quantize

__all__ = [
    "LayerMerge",
    "Linear4bit",
    "MergeReport",
    "QuantEmbedding",
    "QuantHead",
    "QuantReport",
    "QuantizedTensor",
    "dequantize_model",
    "merge_into_4bit",
    "quantization_report",
    "quantize",
    "quantize_embeddings",
    "quantize_model",
]
