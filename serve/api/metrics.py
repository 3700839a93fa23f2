"""Prometheus metrics under vLLM's names (vllm/v1/metrics/loggers.py), each with a `model_name` label.

Two sources: the engine's own state (queue sizes, KV-cache use, prefix-cache counters, preemptions) is
read from `engine.stats()` at scrape time by a collector, so it is never stale; per-request latencies
and token counts are observed here, as the server sees each output arrive. One registry per app: no
process-global state, so two apps (or two tests) never share counters.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Bucket edges as in vLLM, so dashboards built for vLLM read qserve unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort")


class _EngineCollector:
    """Reads the engine's gauges and cumulative counters at scrape time."""

    def __init__(self, engine, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def describe(self):
        return []  # metric names are dynamic per scrape; nothing to pre-register

    def collect(self):
        stats = self._engine.stats()
        label = [self._model_name]
        gauges = (
            (
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                stats.num_running,
            ),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", stats.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", stats.kv_cache_usage),
        )
        if hasattr(stats, "resident_weight_bytes"):  # engine-side stats; stand-in engines may lack it
            gauges += (
                (
                    "qserve:resident_weight_bytes",
                    "Bytes of model weights resident in memory (4-bit layers counted packed).",
                    stats.resident_weight_bytes,
                ),
            )
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(label, float(value))
            yield family
        counters = (
            (
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in queried tokens.",
                stats.prefix_cache_queries,
            ),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in cached tokens.", stats.prefix_cache_hits),
            (
                "vllm:num_preemptions",
                "Cumulative number of preemptions from the engine.",
                stats.num_preemptions,
            ),
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(label, float(value))
            yield family


class ServerMetrics:
    """The app's registry and the per-request observations."""

    def __init__(self, engine, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        reg = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                               labels, buckets=TTFT_BUCKETS, registry=reg).labels(model_name)  # fmt: skip
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                              labels, buckets=ITL_BUCKETS, registry=reg).labels(model_name)  # fmt: skip
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                              labels, buckets=E2E_BUCKETS, registry=reg).labels(model_name)  # fmt: skip
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=reg
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=reg
        ).labels(model_name)
        success = Counter(
            "vllm:request_success", "Count of successfully processed requests.", [*labels, "finished_reason"],
            registry=reg,
        )  # fmt: skip
        # Pre-create every reason so a scrape shows zeros instead of missing series.
        self.success = {r: success.labels(model_name, r) for r in FINISH_REASONS}
        self.registry.register(_EngineCollector(engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, num_prompt_tokens: int) -> RequestTrack:
        return RequestTrack(self, num_prompt_tokens)


class RequestTrack:
    """Latency bookkeeping for one engine request, fed with each cumulative output as it arrives."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int) -> None:
        self._m = metrics
        self._num_prompt_tokens = num_prompt_tokens
        self._arrival = time.monotonic()
        self._last: float | None = None
        self._tokens: dict[int, int] = {}  # completion index -> tokens seen
        self.done = False

    def observe(self, output) -> None:
        now = time.monotonic()
        seen = sum(self._tokens.values())
        for completion in output.outputs:
            self._tokens[completion.index] = len(completion.token_ids)
        if sum(self._tokens.values()) > seen:
            if self._last is None:
                self._m.ttft.observe(now - self._arrival)
            else:
                self._m.itl.observe(now - self._last)
            self._last = now
        if output.finished:
            self._m.e2e.observe(now - self._arrival)
            reasons = [c.finish_reason or "abort" for c in output.outputs]
            self._finish(reasons)

    def abort(self, num_completions: int) -> None:
        """The request was cut short (client gone, queue full, shutdown) before it finished."""
        if not self.done:
            self._finish(["abort"] * num_completions)

    def discard(self) -> None:
        """The engine refused the request (e.g. queue full): it never ran, so it is not counted."""
        self.done = True

    def _finish(self, reasons: list[str]) -> None:
        self.done = True
        self._m.prompt_tokens.inc(self._num_prompt_tokens)
        self._m.generation_tokens.inc(sum(self._tokens.values()))
        for reason in reasons:
            self._m.success[reason if reason in self._m.success else "abort"].inc()
