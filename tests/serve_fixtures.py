"""Shared pieces of the serving tests: a tiny Llama with a real (in-memory BPE) tokenizer, adapters of
different ranks and targets saved as folders, and the reference greedy decode of one adapter alone."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from test_data import make_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk

# name -> (rank, targets): different ranks and target sets on purpose
ADAPTERS = {
    "a8": (8, ["q_proj", "v_proj"]),
    "b4": (4, "all-linear"),
    "c16": (16, ["o_proj", "down_proj", "up_proj"]),
}


def tiny_llama(tokenizer, seed: int = 0, context: int = 96) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=context,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def save_adapters(base: torch.nn.Module, out: Path, seed: int = 1) -> dict[str, Path]:
    """Each adapter with B drawn at random (not zero) so it really changes the output."""
    folders = {}
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        model = copy.deepcopy(base)
        lk.inject(model, lk.LoraConfig(r=rank, alpha=2 * rank, target_modules=targets))
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.3)
        folders[name] = lk.save(model, out / name)
    return folders


def reference_greedy(base: torch.nn.Module, folder: Path | None, prompt: list[int], max_new: int,
                     eos: int | None) -> list[int]:
    """What model.generate(do_sample=False) produces with only this adapter (or none) active."""
    model = copy.deepcopy(base)
    if folder is not None:
        lk.load(model, folder)
        lk.set_active(model, "default")
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def tokenizer():
    return make_tokenizer()
