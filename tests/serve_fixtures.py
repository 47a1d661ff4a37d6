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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m lorakit serve ...` in a subprocess on a free loopback port, stopped by the test."""

    def __init__(self, args: list[str], log: Path, api_key: str | None = None, start_timeout: float = 120.0) -> None:
        import os
        import subprocess
        import sys
        import time

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        command = [sys.executable, "-m", "lorakit", "serve", "--port", str(self.port), *args]
        if api_key:
            command += ["--api-key", api_key]
        env = os.environ | {"OMP_NUM_THREADS": "1"}  # a tiny model gains nothing from threads; spares a busy host
        self.process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", headers=self.headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server did not start in {start_timeout}s:\n{log.read_text()[-3000:]}")

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.headers and self.headers["Authorization"][7:]
                             or "unused", max_retries=0, timeout=60)

    def stop(self, timeout: float = 30.0) -> int:
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def save_tiny_model(folder: Path) -> tuple[LlamaForCausalLM, object]:
    """The tiny Llama and its tokenizer as a Hugging Face folder `lorakit serve --model` reads."""
    from lorakit.models import save_hf_folder

    tok = tokenizer()
    model = tiny_llama(tok)
    save_hf_folder(model, tok, folder)
    return model, tok
