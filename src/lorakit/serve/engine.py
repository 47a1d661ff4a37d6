"""The serving engine: a scheduler thread doing continuous batching over one model and many adapters.

Each iteration of the loop: run queued commands (adapter load/unload), drop cancelled requests, admit
waiting requests into free rows (their prompts prefilled together, within a token budget, so a burst of
long prompts cannot stall the running rows for more than one bounded prefill), then one decode step for
every running row. Finished rows leave the batch at once and their KV cache is freed. Results go back to
the caller through each request's `emit` callback (called from the engine thread).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import LorakitError
from .batch import RunningBatch
from .metrics import ServerMetrics
from .registry import AdapterRegistry
from .sampling import SamplingParams, TokenChoice, choose, make_generator
from .text import TextTracker


class QueueFull(LorakitError):
    """The waiting queue is at its bound; the client should retry later."""


@dataclass
class Delta:
    """Newly settled text of one request, with the tokens that produced it."""

    text: str
    tokens: list[TokenChoice]


@dataclass
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str
    status: int = 500
    kind: str = "server_error"


@dataclass
class Request:
    """One completion: prompt tokens, the adapter (None = base), decoding settings, where results go."""

    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[Delta | Finished | Failed], None]
    model_name: str = ""
    id: int = field(default_factory=itertools.count().__next__)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    first_token_at: float | None = None
    generated: int = 0
    pending: list[TokenChoice] = field(default_factory=list)
    text: TextTracker | None = None
    generator: torch.Generator | None = None
    last_token: int = 0

    def cancel(self) -> None:
        """Called from any thread (e.g. the client went away); the engine frees the row at its next step."""
        self.cancelled = True


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any, registry: AdapterRegistry, *, max_batch: int = 16,
                 max_queue: int = 256, prefill_tokens: int = 2048, metrics: ServerMetrics | None = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise LorakitError("--max-batch and the queue size must be at least 1")
        self.model, self.tokenizer, self.registry = model.eval(), tokenizer, registry
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.metrics = metrics or ServerMetrics()
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.batch: RunningBatch | None = None
        self.commands: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)

    # ---- any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is still queued or running (each gets a Failed event) and end the loop."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout)

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when the bound is reached (nothing grows without limit)."""
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the queue's bound); retry later")
            self.registry.acquire(request.adapter)
            self.waiting.append(request)
            self.metrics.queue_depth.set(len(self.waiting))
        self.wake.set()

    def call(self, command: Callable[[], Any]) -> Future:
        """Run `command` on the engine thread between two steps (the only place the model changes)."""
        future: Future = Future()
        self.commands.put((command, future))
        self.wake.set()
        return future

    # ---- engine thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping:
            self._run_commands(limit=1 if self.running else None)  # a running batch waits for one command at most
            if not self.waiting and not self.running:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                self.step()
            except Exception as exc:  # a failing forward must not kill the server: fail its requests
                for request in [*self.running]:
                    self._fail(request, f"generation failed: {type(exc).__name__}: {exc}")
                self.running, self.batch = [], None
        self._run_commands()
        for request in [*self.running, *self.waiting]:
            self._fail(request, "the server shut down before this request finished", 503, "server_shutdown")
        self.running, self.batch = [], None
        self.waiting.clear()

    def _run_commands(self, limit: int | None = None) -> None:
        done = 0
        while limit is None or done < limit:
            done += 1
            try:
                command, future = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(command())
            except Exception as exc:
                future.set_exception(exc)

    def step(self) -> None:
        """One scheduler iteration: drop cancelled, admit and prefill, decode once."""
        self._drop_cancelled()
        with torch.inference_mode():
            self._admit()
            if self.running:
                tokens = torch.tensor([r.last_token for r in self.running], device=self.device)
                logits = self.batch.decode(self.model, self.registry.bank, tokens)
                self._advance(self.running, logits)
        self.metrics.running.set(len(self.running))

    def _drop_cancelled(self) -> None:
        with self.lock:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                self._close(request)
        if any(r.cancelled for r in self.running):
            for request in [r for r in self.running if r.cancelled]:
                self._close(request)
            self._keep([i for i, r in enumerate(self.running) if not r.cancelled])

    def _admit(self) -> None:
        """Move waiting requests into free rows, FIFO, within the prefill budget; a request whose adapter
        cannot be loaded yet (every loaded slot busy, or one adapter was already loaded in this step, so
        running rows never wait for more than one load) waits for a later step."""
        chosen, budget, skipped, loads = [], self.prefill_tokens, deque(), 0
        with self.lock:
            while self.waiting and len(self.running) + len(chosen) < self.max_batch:
                request = self.waiting[0]
                if chosen and len(request.prompt) > budget:
                    break
                self.waiting.popleft()
                needs_load = not self.registry.is_loaded(request.adapter)
                if needs_load and loads:
                    skipped.append(request)
                    continue
                loads += needs_load
                try:
                    ready = self.registry.ensure_loaded(request.adapter)
                except Exception as exc:
                    self._fail(request, f"adapter {request.adapter!r} could not be loaded: {exc}", 400,
                               "invalid_request_error")
                    continue
                if not ready:
                    skipped.append(request)
                    continue
                chosen.append(request)
                budget -= len(request.prompt)
            self.waiting.extendleft(reversed(skipped))
            self.metrics.queue_depth.set(len(self.waiting))
        if not chosen:
            return
        for request in chosen:
            request.text = TextTracker(self.tokenizer, request.params.stop)
            request.generator = make_generator(request.params, self.device)
            self.metrics.prompt_tokens.labels(request.model_name).inc(len(request.prompt))
        try:
            batch, logits = RunningBatch.prefill(self.model, self.registry.bank, [r.prompt for r in chosen],
                                                 [r.adapter for r in chosen])
        except Exception as exc:  # only the new requests fail; the running batch is untouched
            for request in chosen:
                self._fail(request, f"prefill failed: {type(exc).__name__}: {exc}")
            return
        if self.batch is None:
            self.batch = batch
        else:
            self.batch.join(batch)
        self.running.extend(chosen)
        start = len(self.running) - len(chosen)
        self._advance(self.running[start:], logits, offset=start)

    def _advance(self, requests: list[Request], logits: torch.Tensor, offset: int = 0) -> None:
        """Sample one token per row, emit settled text, and drop the rows that finished."""
        done = set()
        now = time.monotonic()
        for i, request in enumerate(requests):
            choice = choose(logits[i], request.params, request.generator)
            request.last_token = choice.token
            request.generated += 1
            if request.first_token_at is None:
                request.first_token_at = now
                self.metrics.ttft.observe(now - request.arrived)
            reason = None
            if choice.token in self.eos:
                reason, piece = "stop", request.text.finish()
            else:
                piece, stopped = request.text.add(choice.token)
                request.pending.append(choice)
                if stopped:
                    reason = "stop"
                elif request.generated >= request.params.max_tokens or \
                        len(request.prompt) + request.generated >= self.context:
                    reason, piece = "length", piece + request.text.finish()
            if piece or reason:
                request.emit(Delta(piece, request.pending))
                request.pending = []
            if reason:
                self._finish(request, reason)
                done.add(offset + i)
        if done:
            self._keep([i for i in range(len(self.running)) if i not in done])

    def _keep(self, rows: list[int]) -> None:
        self.running = [self.running[i] for i in rows]
        if not rows:
            self.batch = None
        else:
            self.batch.keep(rows)

    def _finish(self, request: Request, reason: str) -> None:
        self.metrics.completion_tokens.labels(request.model_name).inc(request.generated)
        self.metrics.latency.observe(time.monotonic() - request.arrived)
        request.emit(Finished(reason, len(request.prompt), request.generated))
        self.registry.release(request.adapter)

    def _fail(self, request: Request, message: str, status: int = 500, kind: str = "server_error") -> None:
        request.emit(Failed(message, status, kind))
        self.registry.release(request.adapter)

    def _close(self, request: Request) -> None:
        """A cancelled request: nobody listens any more; only the bookkeeping is undone."""
        self.metrics.cancelled.inc()
        self.registry.release(request.adapter)
