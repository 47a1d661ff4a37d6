"""Tiny models built from configs (random init), the table every core test runs through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

VOCAB = 96


@dataclass
class Case:
    """A model factory, the targets to adapt, an input factory, and how to read its output."""

    name: str
    build: Callable[[], nn.Module]
    targets: list[str] | str | None
    make_input: Callable[[int], dict]
    single_layer: bool = False  # output is linear in the adapter deltas
    mergeable: bool = True  # False: 4-bit weights, merged only by unload(dequantize=True)

    def output(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        out = model(**inputs)
        if isinstance(out, torch.Tensor):
            return out
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                vocab_size=VOCAB, max_position_embeddings=64), add_pooling_layer=False)


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64, num_heads=4,
                                               d_kv=8, vocab_size=VOCAB, decoder_start_token_id=0))


def _linear4bit() -> nn.Module:
    from lorakit.quant import Linear4bit

    return Linear4bit.from_linear(nn.Linear(64, 48), compute_dtype=torch.float32)


def _ids(batch: int, length: int = 12) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length))


CASES = [
    Case("linear", lambda: nn.Linear(12, 20), None, lambda b: {"input": torch.randn(b, 12)}, True),
    Case("conv1d", lambda: nn.Conv1d(4, 6, 3, padding=1), None, lambda b: {"input": torch.randn(b, 4, 10)}, True),
    Case("conv2d", lambda: nn.Conv2d(3, 5, (3, 2), stride=2), None, lambda b: {"input": torch.randn(b, 3, 9, 8)}, True),
    Case("conv2d_k1", lambda: nn.Conv2d(3, 5, 1), None, lambda b: {"input": torch.randn(b, 3, 6, 6)}, True),
    Case("conv3d", lambda: nn.Conv3d(2, 4, 3, padding=1), None, lambda b: {"input": torch.randn(b, 2, 4, 5, 5)}, True),
    Case("conv3d_k1", lambda: nn.Conv3d(2, 4, 1), None, lambda b: {"input": torch.randn(b, 2, 3, 3, 3)}, True),
    Case("linear4bit", lambda: _linear4bit(), None, lambda b: {"input": torch.randn(b, 64)}, True, mergeable=False),
    Case("embedding", lambda: nn.Embedding(VOCAB, 16, padding_idx=0), None, lambda b: {"input": _ids(b)}, True),
    Case("gpt2", _gpt2, ["c_attn", "c_proj", "wpe"], lambda b: {"input_ids": _ids(b)}),
    Case("llama", _llama, "all-linear", lambda b: {"input_ids": _ids(b)}),
    Case("bert", _bert, ["query", "value", "dense", "word_embeddings"], lambda b: {"input_ids": _ids(b)}),
    Case("t5", _t5, ["q", "v", "wi", "wo"],
         lambda b: {"input_ids": _ids(b), "decoder_input_ids": _ids(b, 5)}),
]


def build(case: Case) -> tuple[nn.Module, list[str] | str | None]:
    """The model (in a wrapper for single layers, so the target has a name) and its targets."""
    torch.manual_seed(0)
    model = case.build()
    if case.single_layer:
        return SingleLayer(model), ["layer"]
    return model.eval(), case.targets


class SingleLayer(nn.Module):
    """Gives a bare layer a name to target."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.layer(input)


def randomize_adapters(model: nn.Module, adapter: str = "default", std: float = 0.1, seed: int = 1) -> None:
    """Give B (and a zero A) non-zero values so the adapter changes the output."""
    from lorakit.layers import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_adapters:
                for param in (module.lora_A[adapter], module.lora_B[adapter]):
                    param.copy_(torch.randn(param.shape, generator=gen) * std)
