"""`moe-serve bench`: a load test of any OpenAI-compatible server (ours, `vllm serve`, ...), in the spirit of
`vllm bench serve`. For each concurrency of the sweep it streams --num-prompts completions to /v1/completions
(random token-id prompts of exactly --input-len tokens, or the lines of --dataset), and prints the throughput and
the TTFT, TPOT, ITL and E2E latencies; --out keeps them as JSON, --plot as a PNG.

    moe-serve bench [--base-url http://127.0.0.1:8000] [--model NAME] [--api-key KEY] [--concurrency 1,16,64]
        [--request-rate R] [--num-prompts N] [--input-len N] [--output-len N] [--token-range LO HI]
        [--dataset FILE.jsonl] [--seed S] [--timeout SECONDS] [--out results.json] [--plot plot.png]

Exit status: 0 when every request completed, 1 when some failed, 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import random
import sys
from collections.abc import Iterator

from cluster.bench_report import BenchReport, RunSummary
from cluster.load_generator import BenchRequest, LoadGenerator


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """The `bench` subcommand, for `moe-serve`'s subparsers."""
    b = subparsers.add_parser("bench", help="load-test an OpenAI-compatible server (throughput, TTFT, TPOT, ITL)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(b)
    b.set_defaults(func=run_bench)
    return b


def add_bench_args(b: argparse.ArgumentParser) -> None:
    b.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, with or without /v1")
    b.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    b.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    b.add_argument("--concurrency", type=concurrency_list, default=None, metavar="C,C,...",
                   help="most requests in flight; several, comma-separated, make a sweep (default: no cap)")
    b.add_argument("--request-rate", type=positive(float), default=None, metavar="R",
                   help="Poisson arrivals, R requests/s (default: all at once, a closed loop of C clients)")
    b.add_argument("--num-prompts", type=positive(int), default=100, help="requests per concurrency")
    b.add_argument("--input-len", type=positive(int), default=1024, help="prompt tokens of a random prompt")
    b.add_argument("--output-len", type=positive(int), default=128,
                   help="max_tokens (with ignore_eos, so exactly this many); the default for --dataset lines")
    b.add_argument("--token-range", type=int, nargs=2, default=(32, 256), metavar=("LO", "HI"),
                   help="random prompt token ids are drawn from [LO, HI) (default: ordinary tokens in any vocab)")
    b.add_argument("--dataset", default=None, metavar="FILE.jsonl",
                   help='prompts instead of random ones: {"prompt": text or token ids, "max_tokens": n} per line')
    b.add_argument("--seed", type=int, default=0, help="for the random prompts and the Poisson arrivals")
    b.add_argument("--timeout", type=positive(float), default=600.0, metavar="SECONDS",
                   help="a request fails when the server is silent this long")
    b.add_argument("--out", default=None, metavar="results.json", help="write the summaries and every request")
    b.add_argument("--plot", default=None, metavar="plot.png",
                   help="plot throughput against concurrency and the latency CDFs (needs moe-serve[bench])")


def run_bench(args) -> int:
    try:
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: pip install 'moe-serve[bench]'")
        source = file_requests(args.dataset, args.output_len) if args.dataset else random_requests(args)
        return asyncio.run(sweep(args, source))
    except (ValueError, OSError) as e:
        print(f"moe-serve bench: error: {e}", file=sys.stderr)
        return 2


async def sweep(args, source: Iterator[BenchRequest]) -> int:
    """One run per concurrency, each with the next --num-prompts requests (fresh prompts: no prefix cache hits)."""
    gen = LoadGenerator(args.base_url, args.api_key, args.timeout)
    model = args.model or await gen.served_model()
    prompts = args.dataset or f"random, {args.input_len} tokens in, {args.output_len} out"
    print(f"moe-serve bench: {model} at {gen.base_url}, {args.num_prompts} requests per concurrency ({prompts})")
    runs = []
    for concurrency in args.concurrency or [args.num_prompts]:
        batch = list(itertools.islice(source, args.num_prompts))
        run = await gen.run(model, batch, concurrency, args.request_rate, args.seed)
        print(RunSummary.of(run).table(), flush=True)
        runs.append(run)
    report = BenchReport({"base_url": gen.base_url, "model": model, "prompts": prompts,
                          "num_prompts": args.num_prompts, "request_rate": args.request_rate, "seed": args.seed},
                         runs)
    if args.out:
        report.write_json(args.out)
    if args.plot:
        report.write_plot(args.plot)
    return 0 if all(s.failed == 0 for s in report.summaries) else 1


def random_requests(args) -> Iterator[BenchRequest]:
    """Endless seeded prompts of --input-len token ids from --token-range, each asking for --output-len tokens."""
    lo, hi = args.token_range
    if not 0 <= lo < hi:
        raise ValueError(f"--token-range needs 0 <= LO < HI, got {lo} {hi}")
    rng = random.Random(args.seed)
    while True:
        yield BenchRequest([rng.randrange(lo, hi) for _ in range(args.input_len)], args.output_len)


def file_requests(path: str, output_len: int) -> Iterator[BenchRequest]:
    """The requests of a JSONL file, over and over; a bad line is an error that names it."""
    requests = []
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                requests.append(parse_line(raw, f"{path}:{n}", output_len))
    if not requests:
        raise ValueError(f"{path} holds no requests")
    return itertools.cycle(requests)


def parse_line(raw: str, where: str, output_len: int) -> BenchRequest:
    try:
        line = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    prompt = line.get("prompt") if isinstance(line, dict) else None
    max_tokens = line.get("max_tokens", output_len) if isinstance(line, dict) else None
    ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
    if not prompt or not (isinstance(prompt, str) or ids) or not (isinstance(max_tokens, int) and max_tokens > 0):
        raise ValueError(f'{where}: want {{"prompt": text or token ids, "max_tokens": n > 0}}')
    return BenchRequest(prompt, max_tokens)


def positive(cast):
    """An argparse type: a number above zero."""
    def parse(text: str):
        value = cast(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value

    parse.__name__ = cast.__name__  # argparse names the type in its message
    return parse


def concurrency_list(text: str) -> list[int]:
    try:
        return [positive(int)(c) for c in text.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"want positive integers, comma-separated (1,16,64), not {text}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
