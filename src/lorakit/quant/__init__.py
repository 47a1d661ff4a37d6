"""4-bit NF4/FP4 quantization in bitsandbytes' format, in plain PyTorch: tensors, Linear4bit, whole models
(optionally their embeddings and output head too). `compiled` switches the generated dequantize kernel;
`keep_dequantized` trades memory for one dequantize less per QLoRA step."""

from . import compiled
from .embedding import QuantEmbedding, QuantHead, quantize_embeddings
from .keep import KeepReport, keep_dequantized
from .linear4bit import Linear4bit
from .merge import LayerMerge, MergeReport, merge_into_4bit
from .model import QuantReport, dequantize_model, quantization_report, quantize_model
from .tensor import QuantizedTensor, quantize

__all__ = [
    "KeepReport",
    "LayerMerge",
    "Linear4bit",
    "MergeReport",
    "QuantEmbedding",
    "QuantHead",
    "QuantReport",
    "QuantizedTensor",
    "compiled",
    "dequantize_model",
    "keep_dequantized",
    "merge_into_4bit",
    "quantization_report",
    "quantize",
    "quantize_embeddings",
    "quantize_model",
]
