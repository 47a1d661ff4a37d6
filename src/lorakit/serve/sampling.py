"""Choosing each request's next token: greedy, or temperature / top-p sampling from its own seeded generator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of decoding; temperature 0 is greedy (the argmax, as generate(do_sample=False))."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # completions: the chosen token's logprob and this many alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenChoice:
    """One sampled token, with its log-probability under the model and the top alternatives when asked."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator, so a seeded request draws the same tokens whatever shares its batch."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def choose(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> TokenChoice:
    """The next token from one row of float logits (vocab,)."""
    logits = logits.float()
    if params.greedy:
        token = int(logits.argmax())
    else:
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            probs = _top_p(probs, params.top_p)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if params.logprobs is None:
        return TokenChoice(token)
    logprobs = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logprobs, params.logprobs) if params.logprobs else None
    alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenChoice(token, float(logprobs[token]), alternatives)


def _top_p(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probabilities reach top_p (the first always)."""
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
    sorted_probs[before >= top_p] = 0.0
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()
