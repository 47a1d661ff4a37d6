"""`lorakit serve` under load: concurrent streaming clients on loopback against one server process, side by
side in one run. Every configuration serves the same base with the same adapters (r=16 on every linear layer
but the head, B ~ N(0, 0.01), saved with lk.save) and the same requests: a fixed prompt of --prompt-tokens
token ids, --max-tokens greedy tokens, --clients clients each sending its next request as soon as the last one
ended, until --requests requests are answered or --seconds pass.

  base          every request to the base model (the ceiling)
  mixed1/8/32   requests spread round-robin over the base and 1, 8 or 32 adapters (continuous batching,
                every row its own adapter, read from the persistent banks)
  peft32        the naive server a user would write: a PEFT model behind the same ASGI app, handling one
                request at a time with set_adapter (or disable_adapter) + generate, over the base and 32 adapters
  registered200 200 adapters registered (--adapter-dir), at most 32 loaded: requests over all 200 load on use
                and evict the least recently used
  soak          mixed32 with --soak-clients clients for --soak seconds: failed requests and the server's resident
                memory growth after warm-up (run it with --only soak --soak 300)

Reported: completion tokens/s over the run, time to first token (p50), request latency p50/p99, failed
requests, and ratios to base and to peft32. Clients run in their own process (httpx, asyncio), so the
server's Python threads do not share a GIL with them. Each configuration is its own process (harness.py).
Run: python bench/bench_serve.py [--model tiny|default] [--only base mixed32 peft32] [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from harness import main, table

import lorakit as lk
from lorakit.serve.server import engine_threads

CONFIGS = ["base", "mixed1", "mixed8", "mixed32", "peft32", "registered200", "soak"]
DEFAULT_RUN = ["base", "mixed1", "mixed8", "mixed32", "peft32", "registered200"]
ADAPTERS = {"base": 0, "mixed1": 1, "mixed8": 8, "mixed32": 32, "peft32": 32, "registered200": 200, "soak": 32}


def options() -> argparse.Namespace:
    """This script's own settings, read from the command line in the parent and in every child (harness.py
    forwards the arguments it does not know to each configuration's process)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_known_args()[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M) or 'tiny' (a 2-layer Llama)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256, help="requests per configuration")
    parser.add_argument("--seconds", type=float, default=300, help="time bound per configuration")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the server (default: as `lorakit serve` picks, cores - 1)")
    parser.add_argument("--soak", type=float, default=300, help="seconds of the soak configuration")
    parser.add_argument("--soak-clients", type=int, default=64)
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: run the client load against this URL
    parser.add_argument("--load-spec", help=argparse.SUPPRESS)  # internal: {"models": [...], "vocab": N}


# ---- the server side (one configuration process) ----------------------------------------------------------
def build_base(model_name: str) -> tuple[Any, Any]:
    from lorakit.models import load_base_model

    if model_name == "default":
        return load_base_model("default")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serve_fixtures import tiny_llama, tokenizer

    tok = tokenizer()
    return tiny_llama(tok, context=512), tok


def make_adapters(base: torch.nn.Module, count: int, out: Path) -> dict[str, Path]:
    """`count` adapters saved as folders; later ones reuse the first 32's weights (loading is what is tested)."""
    folders = {}
    model = copy.deepcopy(base)
    for i in range(min(count, 32)):
        lk.add_adapter(model, f"a{i}", lk.LoraConfig(r=16, alpha=32, target_modules="all-linear")) if i else \
            lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules="all-linear"), adapter="a0")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if f"lora_B.a{i}" in name:
                    param.normal_(0, 0.01)
    for i in range(count):
        folders[f"a{i}"] = lk.save(model, out / f"a{i}", adapter=f"a{i % 32}")
    return folders


def lorakit_engine(base: Any, tok: Any, folders: dict[str, Path], args: argparse.Namespace, max_loaded: int) -> Any:
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import AdapterRegistry

    registry = AdapterRegistry(base, "base", max_loaded)
    for name, folder in folders.items():
        registry.register(name, folder)
    return Engine(base, tok, registry, max_batch=args.max_batch, max_queue=4096)


class PeftEngine:
    """The naive alternative behind the same app: one request at a time, set_adapter + generate."""

    def __init__(self, base: Any, tok: Any, folders: dict[str, Path]) -> None:
        from peft import PeftModel

        from lorakit.serve.metrics import ServerMetrics

        names = list(folders)
        self.model = PeftModel.from_pretrained(base, folders[names[0]], adapter_name=names[0]).eval()
        for name in names[1:]:
            self.model.load_adapter(folders[name], adapter_name=name)
        self.tokenizer, self.metrics = tok, ServerMetrics()
        self.context = base.config.max_position_embeddings
        self.registry = _PeftNames(folders)
        self.queue: Any = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.stopping = False

    def start(self) -> None:
        import queue

        self.queue = queue.SimpleQueue()
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.queue.put(None)
        self.thread.join(10)

    def submit(self, request: Any) -> None:
        self.queue.put(request)

    def _loop(self) -> None:
        from lorakit.serve.engine import Delta, Finished
        from lorakit.serve.sampling import TokenChoice

        while not self.stopping:
            request = self.queue.get()
            if request is None or request.cancelled:
                continue
            ids = torch.tensor([request.prompt])
            settings = dict(max_new_tokens=request.params.max_tokens, do_sample=not request.params.greedy,
                            pad_token_id=self.tokenizer.eos_token_id)
            if not request.params.greedy:
                settings |= dict(temperature=request.params.temperature, top_p=request.params.top_p)
            with torch.inference_mode():
                if request.adapter is None:
                    with self.model.disable_adapter():
                        out = self.model.generate(input_ids=ids, **settings)
                else:
                    self.model.set_adapter(request.adapter)
                    out = self.model.generate(input_ids=ids, **settings)
            tokens = out[0, len(request.prompt):].tolist()
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            request.emit(Delta(text, [TokenChoice(t) for t in tokens]))
            reason = "length" if len(tokens) >= request.params.max_tokens else "stop"
            request.emit(Finished(reason, len(request.prompt), len(tokens)))


class _PeftNames:
    def __init__(self, folders: dict[str, Path]) -> None:
        self.paths, self.loaded = dict(folders), dict(folders)

    def names(self) -> list[str]:
        return list(self.paths)

    def known(self, name: str) -> bool:
        return name in self.paths

    def acquire(self, name: str | None) -> None:
        pass


def serve_in_thread(engine: Any) -> tuple[str, Any]:
    import uvicorn

    from lorakit.serve.app import create_app

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serve_fixtures import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "base"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", (server, thread)


def run_config(name: str, _: argparse.Namespace) -> dict:
    import psutil

    args = options()
    torch.set_num_threads(engine_threads(args.threads))
    torch.manual_seed(0)
    base, tok = build_base(args.model)
    base.eval()
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(base, ADAPTERS[name], Path(tmp)) if ADAPTERS[name] else {}
        if name == "peft32":
            engine = PeftEngine(base, tok, folders)
        else:
            engine = lorakit_engine(base, tok, folders, args, max_loaded=32)
        url, (server, thread) = serve_in_thread(engine)
        models = ["base", *folders]
        clients = args.soak_clients if name == "soak" else args.clients
        seconds = args.soak if name == "soak" else args.seconds
        requests = 10**9 if name == "soak" else args.requests
        vocab = len(tok)
        warm = _load(url, models, clients, min(2 * clients, 64), 120, args, vocab)  # warm-up: adapters, allocator
        rss_start = psutil.Process().memory_info().rss
        result = _load(url, models, clients, requests, seconds, args, vocab)
        rss_end = psutil.Process().memory_info().rss
        server.should_exit = True
        thread.join(30)
    return result | {"warmup_failed": warm["failed"], "rss_start_mb": rss_start / 2**20,
                     "rss_growth_pct": 100 * (rss_end - rss_start) / rss_start, "adapters": ADAPTERS[name],
                     "server_threads": torch.get_num_threads()}


def _load(url: str, models: list[str], clients: int, requests: int, seconds: float, args: argparse.Namespace,
          vocab: int) -> dict:
    """The client load in its own process; its last stdout line is the JSON summary."""
    command = [sys.executable, __file__, "--load", url, "--clients", str(clients), "--requests", str(requests),
               "--seconds", str(seconds), "--prompt-tokens", str(args.prompt_tokens),
               "--max-tokens", str(args.max_tokens), "--load-spec", json.dumps({"models": models, "vocab": vocab})]
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if proc.returncode:
        sys.exit(f"client load failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the client side (its own process) ----------------------------------------------------------------------
async def client_load(url: str, models: list[str], vocab: int, args: argparse.Namespace) -> dict:
    import httpx

    started = time.perf_counter()
    deadline = started + args.seconds
    counter = iter(range(args.requests))
    ttft, latency, tokens, failed = [], [], [0], [0]
    prompt = [(7 * i + 3) % (vocab - 10) + 5 for i in range(args.prompt_tokens)]

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            body = {"model": models[i % len(models)], "prompt": prompt, "max_tokens": args.max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            sent, first, done = time.perf_counter(), None, False
            try:
                async with client.stream("POST", url + "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        failed[0] += 1
                        continue
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        chunk = json.loads(line[6:])
                        if first is None:
                            first = time.perf_counter()
                        if chunk.get("usage"):
                            tokens[0] += chunk["usage"]["completion_tokens"]
                        if "error" in chunk:
                            break
            except httpx.HTTPError:
                pass
            if not done:
                failed[0] += 1
                continue
            ttft.append(first - sent)
            latency.append(time.perf_counter() - sent)

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.clients)))
    wall = time.perf_counter() - started
    latency.sort()
    pick = lambda q: latency[min(len(latency) - 1, int(q * len(latency)))] if latency else float("nan")  # noqa: E731
    return {"ok": len(latency), "failed": failed[0], "tokens": tokens[0], "seconds": wall,
            "tokens_per_s": tokens[0] / wall, "ttft_p50_s": statistics.median(ttft) if ttft else float("nan"),
            "latency_p50_s": pick(0.5), "latency_p99_s": pick(0.99)}


def report(results: dict[str, dict]) -> None:
    base = results.get("base", {}).get("tokens_per_s")
    peft = results.get("peft32", {}).get("tokens_per_s")
    rows = []
    for name, r in results.items():
        rows.append([name, r["adapters"], r["server_threads"], r["ok"], r["failed"], f"{r['tokens_per_s']:.1f}",
                     f"{r['tokens_per_s'] / base:.2f}x" if base else "-", f"{r['tokens_per_s'] / peft:.2f}x" if peft else "-",
                     f"{r['ttft_p50_s']:.3f}", f"{r['latency_p50_s']:.3f}", f"{r['latency_p99_s']:.3f}",
                     f"{r['rss_start_mb']:.0f}", f"{r['rss_growth_pct']:+.1f}%"])
    table(rows, ["config", "adapters", "threads", "ok", "failed", "tokens/s", "vs base", "vs peft32", "TTFT p50 s",
                 "latency p50 s", "p99 s", "RSS MB", "RSS growth"])


if __name__ == "__main__":
    if "--load" in sys.argv:
        cli = options()
        spec = json.loads(cli.load_spec)
        print(json.dumps(asyncio.run(client_load(cli.load, spec["models"], spec["vocab"], cli))))
    else:
        if "--only" not in sys.argv and "--config" not in sys.argv:
            sys.argv += ["--only", *DEFAULT_RUN]
        main(CONFIGS, run_config, report)
