"""BenchReport: what a benchmark sweep measured, per concurrency: a table, JSON, and a PNG plot (output throughput
against concurrency; the TTFT and E2E latency CDFs of each concurrency). Failed requests are counted, with their
errors, and left out of the latencies and throughputs."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cluster.load_generator import RunResult


class Stats(NamedTuple):
    """One latency over the completed requests, in ms."""
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stats | None:
        if not seconds:
            return None
        ms = np.asarray(seconds) * 1e3
        return cls(float(ms.mean()), *(float(np.percentile(ms, q)) for q in (50, 90, 99)))


@dataclass(frozen=True)
class RunSummary:
    concurrency: int
    request_rate: float | None  # Poisson arrivals per second; None: all at once
    completed: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float  # prompt and output
    ttft_ms: Stats | None  # None: no request completed (TPOT: none had two tokens)
    tpot_ms: Stats | None
    itl_ms: Stats | None
    e2e_ms: Stats | None
    errors: dict[str, int]  # failure -> how many requests failed so

    @classmethod
    def of(cls, run: RunResult) -> RunSummary:
        ok = [r for r in run.results if r.error is None]
        out = sum(r.output_tokens for r in ok)
        return cls(run.concurrency, run.request_rate, len(ok), len(run.results) - len(ok), run.duration_s,
                   len(ok) / run.duration_s, out / run.duration_s,
                   (out + sum(r.prompt_tokens for r in ok)) / run.duration_s,
                   Stats.of([r.ttft_s for r in ok]), Stats.of([r.tpot_s for r in ok if r.tpot_s is not None]),
                   Stats.of([gap for r in ok for gap in r.itl_s]), Stats.of([r.e2e_s for r in ok]),
                   dict(Counter(r.error for r in run.results if r.error is not None).most_common()))

    def table(self) -> str:
        arrivals = "closed loop" if self.request_rate is None else f"Poisson {self.request_rate:g} req/s"
        total = self.completed + self.failed
        rates = self.requests_per_s, self.output_tokens_per_s, self.total_tokens_per_s
        lines = [f"{f' concurrency {self.concurrency}, {arrivals} ':=^62}",
                 f"completed {self.completed} of {total} in {self.duration_s:.2f} s (failed {self.failed})",
                 f"throughput  {rates[0]:.2f} req/s  {rates[1]:.1f} output tok/s  {rates[2]:.1f} total tok/s",
                 f"{'latency (ms)':<14}" + "".join(f"{h:>12}" for h in Stats._fields)]
        for name, stats in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms), ("ITL", self.itl_ms),
                            ("E2E", self.e2e_ms)):
            cells = [f"{v:>12.2f}" for v in stats] if stats else [f"{'-':>12}"] * len(Stats._fields)
            lines.append(f"{name:<14}" + "".join(cells))
        lines += [f"failed: {n} x {error}" for error, n in self.errors.items()]
        return "\n".join(lines)


class BenchReport:
    def __init__(self, setup: dict, runs: list[RunResult]):
        self.setup = setup  # what was run: endpoint, model, prompts, ...
        self.runs = runs
        self.summaries = [RunSummary.of(run) for run in runs]

    def write_json(self, path: str | Path) -> None:
        """The setup, then per run its summary and each request's numbers (seconds; sent_s from the run's first
        request)."""
        runs = [{**{f.name: plain(getattr(s, f.name)) for f in dataclasses.fields(s)},
                 "requests": [{"sent_s": r.sent_at - first_sent(run), "prompt_tokens": r.prompt_tokens,
                               "output_tokens": r.output_tokens, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s,
                               "e2e_s": r.e2e_s, "error": r.error} for r in run.results]}
                for s, run in zip(self.summaries, self.runs)]
        Path(path).write_text(json.dumps({**self.setup, "runs": runs}, indent=1, allow_nan=False) + "\n")

    def write_plot(self, path: str | Path) -> None:
        from matplotlib.figure import Figure  # the `bench` extra

        fig = Figure(figsize=(15, 4.5), layout="constrained")
        put, *cdfs = fig.subplots(1, 3)
        levels = [s.concurrency for s in self.summaries]
        put.plot(levels, [s.output_tokens_per_s for s in self.summaries], "o-")
        put.set_xscale("log", base=2)
        put.set_xticks(levels, [str(c) for c in levels])
        put.minorticks_off()
        put.set(xlabel="concurrency", ylabel="output tokens/s", title="output throughput", ylim=(0, None))
        for ax, name, field in zip(cdfs, ("TTFT", "E2E latency"), ("ttft_s", "e2e_s")):
            for run in self.runs:
                ms = np.sort([getattr(r, field) * 1e3 for r in run.results if r.error is None])
                ax.plot(ms, np.arange(1, len(ms) + 1) / max(len(ms), 1), drawstyle="steps-post",
                        label=f"concurrency {run.concurrency}")
            ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", title=f"{name} CDF", ylim=(0, 1.02))
            ax.legend()
        fig.savefig(path, dpi=100)


def plain(value):
    """Stats as a JSON object (not a list), anything else as it is."""
    return value._asdict() if isinstance(value, Stats) else value


def first_sent(run) -> float:
    return min((r.sent_at for r in run.results), default=0.0)
