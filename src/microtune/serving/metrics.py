"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Scraped at ``GET /metrics``: requests by route and status, request latency, batch sizes, queue depth,
loaded entries (adapters and own model instances) and their bytes, loads and evictions, requests shed.
"""
from __future__ import annotations

from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("microtune_requests", "HTTP requests answered", ["route", "status"], registry=self.registry)
        self.latency = Histogram("microtune_request_seconds", "Request latency (seconds)", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("microtune_batch_size", "Requests per forward batch", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue = Gauge("microtune_queue_depth", "Requests waiting for the batcher", registry=self.registry)
        self.adapters = Gauge("microtune_adapters_loaded", "Micro-models in memory (adapters and own model instances)", registry=self.registry)
        self.loaded_bytes = Gauge("microtune_loaded_bytes", "Bytes of the loaded micro-models (the max_memory_mb budget)",
                                  registry=self.registry)
        self.adapter_events = Counter("microtune_adapter_events", "Micro-model loads and evictions", ["event"], registry=self.registry)
        self.shed = Counter("microtune_shed", "Requests refused at once (429) because their expected wait was past the timeout",
                            registry=self.registry)

    def watch(self, queue_depth: Callable[[], int], loaded: Callable[[], int], loaded_bytes: Callable[[], int] = lambda: 0) -> None:
        self.queue.set_function(queue_depth)
        self.adapters.set_function(loaded)
        self.loaded_bytes.set_function(loaded_bytes)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)


