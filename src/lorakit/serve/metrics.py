"""The server's Prometheus metrics, in a registry of its own (several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorakit_requests", "HTTP requests answered, by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "prompt tokens prefilled, by model", ["model"],
                                     registry=r)
        self.completion_tokens = Counter("lorakit_completion_tokens", "tokens generated, by model", ["model"],
                                         registry=r)
        self.cancelled = Counter("lorakit_cancelled_requests", "requests whose client went away", registry=r)
        self.queue_depth = Gauge("lorakit_queue_depth", "requests waiting for a row", registry=r)
        self.running = Gauge("lorakit_running_batch_size", "rows in the running batch", registry=r)
        self.adapters_loaded = Gauge("lorakit_adapters_loaded", "adapters held in the model", registry=r)
        self.adapters_registered = Gauge("lorakit_adapters_registered", "adapters the server knows", registry=r)
        self.latency = Histogram("lorakit_request_latency_seconds", "arrival to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
