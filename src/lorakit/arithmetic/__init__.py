"""Adapter arithmetic on true updates ΔW = s·B·A: combine adapters, resize one, extract one from weights."""

from .combine import METHODS, combine
from .extract import extract
from .report import LayerReport, RankReport
from .resize import resize

__all__ = ["combine", "resize", "extract", "RankReport", "LayerReport", "METHODS"]
