"""Inference metrics for Prometheus (what llama-swap's ``/metrics`` lacks).

Counters and histograms are updated from the request path and the event bus;
model state, queue depth and in-flight gauges are read at scrape time.  All of
it lives in a registry owned by the service, never prometheus-client's global
default registry.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from .events import EventBus

STATES = ("stopped", "starting", "ready", "stopping", "shutdown")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOAD_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class _LiveGauges:
    """Model state, queue depth and in-flight requests, read when scraped."""

    def __init__(self, runtime: Callable[[], object]):
        self.runtime = runtime

    def collect(self):
        runtime = self.runtime()
        state = GaugeMetricFamily("llamaswap_model_state", "1 for the state each model is in",
                                  labels=["model", "state"])
        queue = GaugeMetricFamily("llamaswap_queue_depth", "Requests queued per model", labels=["model"])
        inflight = GaugeMetricFamily("llamaswap_inflight_requests", "Requests being served per model",
                                     labels=["model"])
        scheduler = runtime.router.scheduler
        depth: dict[str, int] = {m: 0 for m in runtime.processes}
        for entry in scheduler.queue_snapshot():
            depth[entry.model] = depth.get(entry.model, 0) + 1
        for model_id, process in sorted(runtime.processes.items()):
            current = str(process.state)
            for s in STATES:
                state.add_metric([model_id, s], 1.0 if s == current else 0.0)
            queue.add_metric([model_id], depth.get(model_id, 0))
            inflight.add_metric([model_id], scheduler.in_flight(model_id))
        yield state
        yield queue
        yield inflight
        yield from _resource_gauges(runtime)


def _resource_gauges(runtime):
    """Per resource of ``resources.capacity``: capacity, what running models
    use (declared, measured, and planned = max of the two per model), and
    every model's footprint.  Running = starting, ready or stopping."""
    config = runtime.config
    if not config.resources:
        return
    footprints = runtime.footprints
    capacity = GaugeMetricFamily("llamaswap_resource_capacity", "resources.capacity per resource",
                                 labels=["resource"])
    used = GaugeMetricFamily("llamaswap_resource_used",
                             "Summed footprints of running models (declared, measured, planned = max of both)",
                             labels=["resource", "kind"])
    footprint = GaugeMetricFamily("llamaswap_model_footprint", "Each model's footprint (declared, measured)",
                                  labels=["model", "resource", "kind"])
    running = [m for m, p in runtime.processes.items() if str(p.state) in ("starting", "ready", "stopping")]
    for resource, amount in sorted(config.resources.capacity.items()):
        capacity.add_metric([resource], amount)
        sums = {"declared": 0.0, "measured": 0.0, "planned": 0.0}
        for model in running:
            sums["declared"] += footprints.declared(model).get(resource, 0)
            sums["measured"] += footprints.measured.get(model, {}).get(resource, 0)
            sums["planned"] += footprints.planned(model).get(resource, 0)
        for kind, value in sums.items():
            used.add_metric([resource, kind], value)
    for model in sorted(runtime.processes):
        for resource, amount in sorted(footprints.declared(model).items()):
            footprint.add_metric([model, resource, "declared"], amount)
        for resource, amount in sorted(footprints.measured.get(model, {}).items()):
            footprint.add_metric([model, resource, "measured"], amount)
    yield capacity
    yield used
    yield footprint


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry, runtime: Callable[[], object], events: EventBus, clock):
        self.clock = clock
        # "key": the API key's name ("-" without one): only configured names, so bounded
        self.requests = Counter("llamaswap_requests", "Proxied model requests",
                                ["model", "path", "status", "key"], registry=registry)
        self.duration = Histogram("llamaswap_request_duration_seconds",
                                  "Time from request arrival to the end of the response (queue and load included)",
                                  ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.ttfb = Histogram("llamaswap_time_to_first_byte_seconds",
                              "Time from request arrival to the upstream's response headers",
                              ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens = Counter("llamaswap_tokens", "Tokens processed", ["model", "kind", "key"], registry=registry)
        self.refused = Counter("llamaswap_key_refused", "Requests refused by an API key's scope or limits",
                               ["key", "reason"], registry=registry)
        self.loads = Counter("llamaswap_model_loads", "Model starts", ["model"], registry=registry)
        self.load_duration = Histogram("llamaswap_model_load_duration_seconds",
                                       "Time from process start to healthy", ["model"],
                                       buckets=LOAD_BUCKETS, registry=registry)
        self.swaps = Counter("llamaswap_swaps", "Swaps started by the scheduler", registry=registry)
        self.queue_wait = Histogram("llamaswap_queue_wait_seconds",
                                    "Time a request waited for its model (queue and load)", ["model"],
                                    buckets=LATENCY_BUCKETS, registry=registry)
        registry.register(_LiveGauges(runtime))
        self._starting: dict[str, float] = {}
        self._children: dict = {}  # (metric, label values) -> child: labels() takes a lock and builds a tuple
        events.subscribe(self._on_event, kinds=("swap", "modelStatus"))

    def _on_event(self, kind: str, data) -> None:
        if kind == "swap":
            self.swaps.inc()
        elif kind == "modelStatus":
            model, state = data["id"], data["state"]
            if state == "starting":
                self.loads.labels(model).inc()
                self._starting[model] = self.clock.seconds()
            elif state == "ready" and model in self._starting:
                self.load_duration.labels(model).observe(self.clock.seconds() - self._starting.pop(model))
            elif state in ("stopped", "stopping", "shutdown"):
                self._starting.pop(model, None)

    def _child(self, metric, *values: str):
        """``metric.labels(*values)``, remembered (label sets never go away here)."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def request_done(self, model: str, path: str, status: int, seconds: float, key: str = "-") -> None:
        self._child(self.requests, model, path, str(status), key).inc()
        self._child(self.duration, model).observe(seconds)

    def first_byte(self, model: str, seconds: float) -> None:
        self._child(self.ttfb, model).observe(seconds)

    def waited(self, model: str, seconds: float) -> None:
        self._child(self.queue_wait, model).observe(seconds)

    def count_tokens(self, model: str, tokens, key: str = "-") -> None:
        for kind, value in (("input", tokens.input_tokens), ("output", tokens.output_tokens),
                            ("cached", tokens.cache_tokens)):
            if value > 0:
                self._child(self.tokens, model, kind, key).inc(value)

    def key_refused(self, key: str, reason: str) -> None:
        """``reason``: model (out of scope), concurrency_limit or rate_limit_exceeded."""
        self.refused.labels(key, reason).inc()
