"""Embedding base kind: A is (r, num_embeddings) and starts at zero, B is (embedding_dim, r), as PEFT lays them out."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError
from .core import AdapterSpec, LoraLayer
from .loralib_style import LoralibAttributes, use_loralib_keys


class Embedding(LoralibAttributes, LoraLayer, nn.Embedding):
    """nn.Embedding with adapters; also loralib's `lora.Embedding` when constructed directly."""

    lora_base_class = nn.Embedding
    lora_zero_init_A = True

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self.lora_setup(merge_on_eval=merge_weights)
        use_loralib_keys(self)
        if r > 0:
            self.lora_add("default", AdapterSpec(r=r, alpha=lora_alpha))
            self.lora_set_active(["default"])
            self.weight.requires_grad = False

    @property
    def lora_out_features(self) -> int:
        return self.embedding_dim

    def lora_shapes(self, spec: AdapterSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if spec.groups is not None:
            raise LorakitError("enable_lora (fused parts) applies to linear layers only, not nn.Embedding")
        return (spec.r, self.num_embeddings), (self.embedding_dim, spec.r)

    def lora_hidden(self, x: Tensor, A: Tensor) -> Tensor:
        return F.embedding(
            x, A.T, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )

    def lora_expand(self, h: Tensor, B: Tensor) -> Tensor:
        return F.linear(h, B)

    def lora_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.T

    def lora_dense_weight(self) -> Tensor:
        return self.weight.T
