"""Prometheus metrics (prometheus-client): requests, latencies, tokens, and the engine's state.

Labels hold only what is safe to show: the route's path template, the status code, the finish
reason. Nothing from a request's content ever becomes a label or a value.
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from localvl.engine.events import RequestRecord

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class _EngineCollector(Collector):
    """The engine's own counters and gauges, read when Prometheus scrapes."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Any]:
        stats = getattr(self.engine, "stats", None)
        if stats is None:
            return
        values = stats()
        gauges = {
            "running": ("localvl_running_requests", "requests in the running batch"),
            "waiting": ("localvl_queued_requests", "requests submitted and not yet started"),
            "blocks_used": ("localvl_kv_blocks_used", "KV-cache blocks in use"),
            "blocks_total": ("localvl_kv_blocks_total", "KV-cache blocks in the pool"),
        }
        for key, (name, doc) in gauges.items():
            if key in values:
                yield GaugeMetricFamily(name, doc, value=values[key])
        counters = {
            "steps": ("localvl_engine_steps", "engine steps run"),
            "preemptions": ("localvl_preemptions", "sequences preempted for lack of KV blocks"),
            "images_encoded": ("localvl_images_encoded", "images run through the vision tower"),
            "image_cache_hits": ("localvl_image_cache_hits", "images whose vision-tower output was reused"),
            "states_restored": ("localvl_states_restored", "hybrid decoders: prefix hits resumed from a kept linear-attention state"),
            "failures": ("localvl_engine_failures", "engine steps that failed"),
        }
        for key, (name, doc) in counters.items():
            if key in values:
                yield CounterMetricFamily(name, doc, value=values[key])


class Metrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("localvl_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.request_seconds = Histogram("localvl_http_request_seconds", "HTTP request time (to the end of the body)",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("localvl_time_to_first_token_seconds", "submit to first generated token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("localvl_time_per_output_token_seconds", "time per generated token after the first",
                              buckets=TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("localvl_generation_seconds", "submit to finish of a generation",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter("localvl_generations", "finished generations by reason", ["reason"], registry=self.registry)
        self.tokens = Counter("localvl_tokens", "prompt and generated tokens", ["kind"], registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        observers = getattr(engine, "observers", None)
        if observers is not None:
            observers.append(self.observe)

    def observe(self, record: RequestRecord) -> None:
        self.finished.labels(record.reason).inc()
        self.e2e.observe(record.duration_s)
        self.tokens.labels("prompt").inc(record.input_tokens)
        self.tokens.labels("prompt_cached").inc(record.cache_read_tokens)
        self.tokens.labels("output").inc(record.output_tokens)
        if record.ttft_s is not None:
            self.ttft.observe(record.ttft_s)
            if record.output_tokens > 1:
                self.tpot.observe((record.duration_s - record.ttft_s) / (record.output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
