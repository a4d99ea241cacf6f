"""Prometheus metrics of one app: requests by route and status, latency, batch sizes, index,
and the decode pool (busy workers, queue depth, worker restarts by reason)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cachebind.sandbox import SandboxStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """One registry per app, so that several apps (tests, Ray replicas) never share counters."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cachebind_requests_total",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cachebind_request_latency_seconds",
            "Time from request to the end of the response, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cachebind_batch_size",
            "Items per micro-batch, by batcher (encoder:<modality>, index).",
            ["batcher"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.index_version = Gauge(
            "cachebind_index_info",
            "The index version being served (value 1 on its label).",
            ["version"],
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "cachebind_connections_refused_total",
            "Connections answered and closed before a request reached the app, by reason "
            "(too_many_connections: an address over its caps; head_too_large: 431).",
            ["reason"],
            registry=self.registry,
        )
        self.index_reloads = Counter(
            "cachebind_index_reloads_total",
            "Index reload attempts by outcome (ok, failed).",
            ["outcome"],
            registry=self.registry,
        )

        self.generate_queue = Gauge(
            "cachebind_generate_queue_depth",
            "Generations waiting for a decoder slot.",
            registry=self.registry,
        )
        self.generate_running = Gauge(
            "cachebind_generate_batch_occupancy",
            "Generations holding a decoder slot (decoded together each step).",
            registry=self.registry,
        )
        self.generate_ttft = Histogram(
            "cachebind_generate_time_to_first_token_seconds",
            "From a generation's submission to its first sampled token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generate_tokens = Counter(
            "cachebind_generate_tokens_total",
            "Tokens generated (the rate is the decoder's tokens/s).",
            registry=self.registry,
        )
        self.generate_finished = Counter(
            "cachebind_generate_finished_total",
            "Generations that left the decoder, by reason (eos, length, stop, cancelled, error).",
            ["reason"],
            registry=self.registry,
        )

    def count_refused(self, error: str) -> None:
        """A connection the protocol answered with ``error`` and closed."""
        self.connections_refused.labels(reason=error).inc()

    def watch_decoders(self, stats: Callable[[], SandboxStats | None]) -> None:
        """Export the decode pool's ``stats()`` at each scrape."""
        self.registry.register(_DecodePoolCollector(stats))

    # The generation scheduler's observer (cachebind.inject.scheduler.SchedulerObserver).

    def scheduler_state(self, queued: int, running: int) -> None:
        self.generate_queue.set(queued)
        self.generate_running.set(running)

    def first_token(self, seconds: float) -> None:
        self.generate_ttft.observe(seconds)

    def tokens(self, n: int) -> None:
        self.generate_tokens.inc(n)

    def finished(self, reason: str) -> None:
        self.generate_finished.labels(reason=reason).inc()

    def set_index_version(self, version: str | None) -> None:
        self.index_version.clear()
        if version is not None:
            self.index_version.labels(version=version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DecodePoolCollector:
    """Reads the pool when scraped: its gauges are never stale, and no thread updates them."""

    def __init__(self, stats: Callable[[], SandboxStats | None]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        if stats is None:
            return
        yield GaugeMetricFamily(
            "cachebind_decode_workers", "Decode worker processes configured.", stats.workers
        )
        yield GaugeMetricFamily(
            "cachebind_decode_workers_busy", "Decode workers running an input now.", stats.busy
        )
        yield GaugeMetricFamily(
            "cachebind_decode_queue_depth", "Inputs waiting for a decode worker.", stats.queued
        )
        restarts = CounterMetricFamily(
            "cachebind_decode_worker_restarts",
            "Decode workers killed and replaced, by reason (crashed, memory_cap, cpu_cap, "
            "deadline, abandoned, bad_answer, died_idle).",
            labels=["reason"],
        )
        for reason, count in sorted(stats.restarts.items()):
            restarts.add_metric([reason], count)
        yield restarts
