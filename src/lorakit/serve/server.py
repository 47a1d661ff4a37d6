"""`lorakit serve` put together: options (flags < --config file), the base model and its adapters, the
engine, the app, and uvicorn with a graceful SIGTERM (stop accepting, let in-flight requests finish for up
to `drain_timeout` seconds, cancel the rest, exit with status 0)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import uvicorn

from ..errors import LorakitError
from ..train.config_file import read_settings_file
from .app import create_app
from .engine import Engine
from .metrics import ServerMetrics
from .registry import AdapterRegistry

DEFAULT_NAME = "SmolLM2-135M-Instruct"  # the embedded default's served name
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


@dataclass
class ServeOptions:
    """Every setting of `lorakit serve`; a --config file may hold any of them (adapter as NAME: PATH)."""

    model: str = "default"
    served_model_name: str | None = None
    adapter: dict[str, str] = field(default_factory=dict)
    adapter_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_adapters: int = 8
    max_queue: int = 256
    prefill_tokens: int = 2048
    quantize: str | None = None
    dtype: str = "fp32"
    api_key: str | None = None
    drain_timeout: float = 30.0
    threads: int | None = None  # torch threads of the engine; None: engine_threads() decides

    @property
    def base_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return DEFAULT_NAME if self.model == "default" else Path(self.model).name.removesuffix(".gguf")


FIELDS = frozenset(f.name for f in dataclasses.fields(ServeOptions))


def serve_options(config: Path | None, flags: dict[str, Any]) -> ServeOptions:
    """Defaults < --config file < flags given on the command line (adapters from both are kept)."""
    values = read_settings_file(config, FIELDS) if config else {}
    adapters = _adapter_map(values.pop("adapter", {}) or {}, "--config adapter")
    adapters |= _adapter_map(flags.pop("adapter", []) or [], "--adapter")
    try:
        return ServeOptions(**(values | flags), adapter=adapters)
    except TypeError as exc:
        raise LorakitError(f"lorakit serve settings: {exc}") from None


def build_engine(options: ServeOptions, log: Callable[[str], None] = print) -> Engine:
    """Load the base (and quantize it), register the adapters, and make the (not yet started) engine."""
    import torch

    from ..models import load_base_model
    from ..quant import quantize_model

    if options.dtype not in DTYPES:
        raise LorakitError(f"--dtype {options.dtype!r}: use fp32 or bf16")
    if options.quantize not in (None, "nf4", "fp4"):
        raise LorakitError(f"--quantize {options.quantize!r}: use nf4 or fp4")
    dtype = getattr(torch, DTYPES[options.dtype])
    torch.set_num_threads(engine_threads(options.threads))
    model, tokenizer = load_base_model(options.model, dtype)
    if tokenizer is None:
        raise LorakitError(f"{options.model} has no tokenizer files; serving needs one beside the weights")
    if options.quantize:
        quantize_model(model, options.quantize, compute_dtype=dtype, skip=("lm_head",))
    registry = AdapterRegistry(model, options.base_name, options.max_adapters)
    for name, path in options.adapter.items():
        registry.register(name, path)
    if options.adapter_dir:
        for name, path in _scan(Path(options.adapter_dir)):
            registry.register(name, path)
    engine = Engine(model, tokenizer, registry, max_batch=options.max_batch, max_queue=options.max_queue,
                    prefill_tokens=options.prefill_tokens, metrics=ServerMetrics())
    for name in list(options.adapter)[:options.max_adapters]:  # named adapters are checked before serving
        try:
            registry.ensure_loaded(name)
        except LorakitError as exc:
            raise LorakitError(f"--adapter {name}={options.adapter[name]}: {exc}") from None
    log(f"base {options.base_name}; {len(registry.names())} adapters registered, {len(registry.loaded)} loaded "
        f"(at most {options.max_adapters} at once); {torch.get_num_threads()} torch threads")
    return engine


def engine_threads(requested: int | None, environ: dict[str, str] | None = None,
                   cores: int | None = None) -> int:
    """Torch threads for the engine: as asked; else OMP_NUM_THREADS when the user set it; else one fewer than
    the usable cores. The event loop, the tokenizer and local clients need a core of their own: on two cores,
    many small two-thread operators lose more to a preempted thread than the second core gives (requests
    over 32 adapters: 58.4 tokens/s with two threads, 74.1 with one; docs/serving.md)."""
    if requested is not None:
        if requested < 1:
            raise LorakitError(f"--threads {requested}: use 1 or more")
        return requested
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(environ["OMP_NUM_THREADS"]) >= 1:
        return int(environ["OMP_NUM_THREADS"])
    cores = cores if cores is not None else _usable_cores()
    return max(1, cores - 1)


def _usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one, as in containers with cpusets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run(options: ServeOptions, log: Callable[[str], None] = print) -> None:
    """Serve until SIGTERM / Ctrl-C."""
    engine = build_engine(options, log)
    app = create_app(engine, options.base_name, options.api_key)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="info",
                            timeout_graceful_shutdown=options.drain_timeout)
    _Server(config).run()


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM that drained cleanly exits with status 0 instead of re-raising it."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def _adapter_map(value: Any, where: str) -> dict[str, str]:
    """NAME=PATH strings (flags, or a list in a config) or a NAME: PATH mapping (config) -> {name: path}."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    out = {}
    for item in value if isinstance(value, list) else [value]:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise LorakitError(f"{where} {item!r}: expected NAME=PATH, e.g. sentiment=runs/train/adapter")
        if name in out:
            raise LorakitError(f"{where}: the name {name!r} is given twice")
        out[name] = path
    return out


def _scan(folder: Path) -> list[tuple[str, Path]]:
    """Every subfolder holding an adapter_config.json, named after the subfolder."""
    if not folder.is_dir():
        raise LorakitError(f"--adapter-dir {folder}: no such folder")
    found = sorted((p.parent.name, p.parent) for p in folder.glob("*/adapter_config.json"))
    if not found:
        raise LorakitError(f"--adapter-dir {folder}: no subfolder holds an adapter_config.json")
    return found
