"""Metrics: Prometheus series with vLLM's names under our prefix (`vllm:x` -> `moe_serve:x`), so that existing
vLLM dashboards carry over by changing the prefix.

Request series (TTFT, time per output token, end-to-end latency, tokens, finished requests) are observed by the
front door as outputs stream; engine series (running, waiting, KV usage, prefix hits, preemptions) are read from
the engine's stats at each scrape.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from router.engine_stats import EngineStats
from router.request_output import RequestOutput

PREFIX = "moe_serve"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0)


class EngineCollector:
    """Gauges from the engine's stats, read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self.stats = stats
        self.model_name = model_name

    def collect(self):
        s = self.stats()
        for name, doc, value in [
            ("num_requests_running", "Sequences in the running batch.", s.running),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", s.waiting),
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", s.kv_usage),
            ("prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache.", s.prefix_hit_rate),
        ]:
            g = GaugeMetricFamily(f"{PREFIX}:{name}", doc, labels=["model_name"])
            g.add_metric([self.model_name], value)
            yield g
        c = CounterMetricFamily(f"{PREFIX}:num_preemptions", "Sequences preempted by recompute.",
                                labels=["model_name"])
        c.add_metric([self.model_name], s.num_preemptions)
        yield c


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.success = Counter(f"{PREFIX}:request_success", "Finished requests, by finish reason.",
                               labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}:prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}:generation_tokens", "Generated tokens.", labels, registry=r)
        self.ttft = Histogram(f"{PREFIX}:time_to_first_token_seconds", "Time to the first output token.", labels,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}:time_per_output_token_seconds", "Mean time between output tokens, per "
                              "request.", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             labels, buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(stats, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def observe(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Passes a request's outputs through, timing them."""
        start = time.perf_counter()
        first = last = None
        tokens = 0
        m = self.model_name
        try:
            async for out in outputs:
                gained = sum(len(c.token_ids) for c in out.outputs)
                if gained:
                    last = time.perf_counter()
                    if first is None:
                        first = last
                        self.ttft.labels(m).observe(first - start)
                    tokens += gained
                    self.generation_tokens.labels(m).inc(gained)
                for c in out.outputs:
                    if c.finish_reason is not None:
                        self.success.labels(m, c.finish_reason).inc()
                if out.finished:
                    self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
                    if first is not None and tokens > 1:
                        self.tpot.labels(m).observe((last - first) / (tokens - 1))
                    self.e2e.labels(m).observe(time.perf_counter() - start)
                yield out
        finally:
            await outputs.aclose()  # a consumer that left: the engine stream's close aborts the request
