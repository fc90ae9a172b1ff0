"""Metrics: Prometheus series with vLLM's names under our prefix (`vllm:x` -> `moe_serve:x`), so that existing
vLLM dashboards carry over by changing the prefix.

Request series (TTFT, time per output token, end-to-end latency, tokens, finished requests) are observed by the
front door as outputs stream; engine series (running, waiting, KV usage, prefix hits, preemptions) are read from
the engine's stats at each scrape.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from router.request_output import RequestOutput

PREFIX = "moe_serve"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0)


class EngineCollector:
    """Series from the engine's stats, read when Prometheus scrapes: gauges of the whole, and per replica the tokens
    routed to each expert and each worker's steps and busy time."""

    def __init__(self, engine, model_name: str):
        """engine: has stats() -> EngineStats and worker_stats() -> {replica: WorkerStats}."""
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        s = self.engine.stats()
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
        yield from self.collect_workers()

    def collect_workers(self):
        labels = ["model_name", "replica"]
        experts = CounterMetricFamily(f"{PREFIX}:expert_tokens", "Token copies routed to each routed expert, over "
                                      "every MoE layer.", labels=labels + ["expert"])
        busy = CounterMetricFamily(f"{PREFIX}:worker_busy_seconds", "Seconds each worker spent on its steps "
                                   "(expert workers: on their MoE rounds).", labels=labels + ["worker"])
        steps = CounterMetricFamily(f"{PREFIX}:worker_steps", "Steps each worker ran (expert workers: MoE rounds).",
                                    labels=labels + ["worker"])
        step_time = GaugeMetricFamily(f"{PREFIX}:worker_step_time_seconds", "Each worker's mean seconds per step "
                                      "(expert workers: per MoE round) over the last few seconds.",
                                      labels=labels + ["worker"])
        for replica, w in self.engine.worker_stats().items():
            for expert, tokens in enumerate(w.expert_tokens):
                experts.add_metric([self.model_name, replica, str(expert)], tokens)
            for t in w.workers:
                busy.add_metric([self.model_name, replica, t.worker], t.busy_s)
                steps.add_metric([self.model_name, replica, t.worker], t.steps)
                step_time.add_metric([self.model_name, replica, t.worker], t.step_s)
        yield from (experts, busy, steps, step_time)


class Metrics:
    def __init__(self, engine, model_name: str):
        """engine: an AsyncEngine or EngineHandle (stats() and worker_stats())."""
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
        self.migrations = Counter(f"{PREFIX}:request_migrations", "Times a request moved to another engine after "
                                  "the one running it was lost (a worker or replica died).", labels, registry=r)
        r.register(EngineCollector(engine, model_name))

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
            self.migrations.labels(m).inc(getattr(outputs, "migrations", 0))
            await outputs.aclose()  # a consumer that left: the engine stream's close aborts the request
