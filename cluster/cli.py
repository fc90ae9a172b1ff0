"""The `moe-serve` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from cluster.bench import add_bench_parser
from cluster.tiny_checkpoint import SHAPES
from router.engine_config import EngineConfig
from workers.checkpoint import CheckpointError
from workers.config import ConfigError
from workers.executor import WorkerError
from workers.sampling_params import SamplingParams

REQUEST_FIELDS = {"prompt", "prompt_token_ids"} | {f.name for f in dataclasses.fields(SamplingParams)}


class InputError(ValueError):
    pass


def parse_request(line: dict, where: str, defaults: dict) -> tuple[str | list[int], SamplingParams]:
    if not isinstance(line, dict):
        raise InputError(f"{where}: each line must be a JSON object")
    unknown = set(line) - REQUEST_FIELDS
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    if ("prompt" in line) == ("prompt_token_ids" in line):
        raise InputError(f"{where}: give exactly one of 'prompt' or 'prompt_token_ids'")
    prompt = line.get("prompt", line.get("prompt_token_ids"))
    if "prompt" in line and not isinstance(prompt, str):
        raise InputError(f"{where}: 'prompt' must be a string")
    if "prompt_token_ids" in line and not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
        raise InputError(f"{where}: 'prompt_token_ids' must be a list of integers")
    kw = {**defaults, **{k: v for k, v in line.items() if k not in ("prompt", "prompt_token_ids")}}
    if isinstance(kw.get("stop"), str):
        kw["stop"] = [kw["stop"]]
    for key in ("stop", "stop_token_ids"):
        if key in kw:
            kw[key] = tuple(kw[key])
    try:
        return prompt, SamplingParams(**kw)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: {e}") from None


def cmd_generate(args) -> int:
    from router.llm_engine import LLMEngine

    defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.prompt is not None:
        requests = [parse_request({"prompt": args.prompt}, "--prompt", defaults)]
    else:
        requests = []
        with open(args.input) as f:
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        line = json.loads(raw)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{args.input}:{n}: not valid JSON ({e})") from None
                    requests.append(parse_request(line, f"{args.input}:{n}", defaults))
    preflight(args.model, args.random_weights)
    config = engine_config(args, args.model)
    t0 = time.perf_counter()
    engine = LLMEngine.from_config(config)
    t_load = time.perf_counter() - t0
    try:
        return run_batch(args, engine, requests, t_load)
    finally:
        engine.shutdown()


def preflight(model: str, random_weights: bool = False):
    """Everything loading the checkpoint would find wrong, found in seconds before any worker, Ray or Serve replica
    starts (where it would be a traceback, or a replica Serve retries): config.json, the safetensors index, each
    shard's header, every tensor's name and shape, and the tokenizer. Returns the ModelConfig; raises ConfigError or
    CheckpointError naming the file or field."""
    from router.llm_engine import load_tokenizer
    from workers.loader import check_checkpoint

    model_config = check_checkpoint(model, random_weights)
    load_tokenizer(Path(model))
    return model_config


def run_batch(args, engine, requests: list, t_load: float) -> int:
    prompts = []
    for i, (prompt, _) in enumerate(requests):
        if isinstance(prompt, str):
            if engine.tokenizer is None:
                raise InputError(f"request {i}: the checkpoint has no tokenizer; give 'prompt_token_ids'")
            prompt = engine.tokenizer.encode(prompt)
        prompts.append(prompt)
    t1 = time.perf_counter()
    outputs = engine.generate(prompts, [p for _, p in requests])
    t_gen = time.perf_counter() - t1
    samples = [(o.request_id, i, c) for i, o in enumerate(outputs) for c in o.outputs]
    n_out = sum(len(c.token_ids) for _, _, c in samples)
    print(f"loaded in {t_load:.2f}s; generated {n_out} tokens for {len(outputs)} requests in {t_gen:.2f}s "
          f"({n_out / max(t_gen, 1e-9):.1f} tok/s)", file=sys.stderr)
    lines = [json.dumps(sample_line(i, c), ensure_ascii=False) for _, i, c in samples]
    if args.output:
        with open(args.output, "w") as f:
            f.write("".join(line + "\n" for line in lines))
    elif args.json:
        print("\n".join(lines))
    else:
        for _, _, c in samples:
            print(c.text)
    return 0


def sample_line(index: int, c) -> dict:
    """One output line: request index, sample index (for n > 1), text, token ids, finish reason, logprobs."""
    line = {"index": index, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
    if c.index:
        line["sample"] = c.index
    if c.logprobs is not None:
        line["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob, "rank": lp.rank,
                             "top": [[t, v] for t, v in lp.top]} for lp in c.logprobs]
    return line


def cmd_tiny_checkpoint(args) -> int:
    from pathlib import Path

    from cluster.tiny_checkpoint import make_checkpoint

    out = make_checkpoint(args.kind, Path(args.dir), seed=args.seed)
    print(f"wrote a tiny random {args.kind} checkpoint to {out}")
    return 0


def placement_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("give one expert worker index per routed expert, comma-separated, "
                                         "e.g. 0,0,1,1") from None


def engine_config(args, model: str) -> EngineConfig:
    return EngineConfig(model=model, dtype=args.dtype, device=args.device, random_weights=args.random_weights,
                        enforce_eager=args.enforce_eager,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_cache_gib=args.kv_cache_gib, max_model_len=args.max_model_len,
                        enable_prefix_caching=not args.no_prefix_caching,
                        attention_workers=args.attention_workers, expert_workers=args.expert_workers,
                        expert_placement=args.expert_placement, micro_batches=args.micro_batches,
                        stream_interval=args.stream_interval)


def default_model() -> str:
    """The embedded default: a tiny random DeepSeek-V2 with V2's 160K-token context and DeepSeek-Coder-V2's chat
    template, made once (deterministically, offline) in the user's cache."""
    from cluster.tiny_checkpoint import default_checkpoint

    return str(default_checkpoint())


UP_FIELDS = {  # `moe-serve up` flags -> the config fields they override
    "model": "model.path", "served_model_name": "model.name", "dtype": "model.dtype", "device": "model.device",
    "random_weights": "model.random_weights", "enforce_eager": "model.enforce_eager", "max_num_seqs": "scheduler.max_num_seqs",
    "max_num_batched_tokens": "scheduler.max_num_batched_tokens", "max_model_len": "scheduler.max_model_len",
    "stream_interval": "scheduler.stream_interval",
    "kv_cache_gib": "cache.kv_cache_gib", "no_prefix_caching": "cache.prefix_caching",
    "attention_workers": "topology.attention_workers", "expert_workers": "topology.expert_workers",
    "expert_placement": "topology.expert_placement", "micro_batches": "topology.micro_batches",
    "engine_replicas": "replicas.engine", "engine_cpus": "resources.engine.cpus", "malloc": "resources.malloc",
    "host": "server.host", "ingress": "server.ingress", "no_ray_dashboard": "server.ray_dashboard",
    "http_port": "server.http_port", "grpc_port": "server.grpc_port", "api_key": "server.api_keys",
}


def overrides(args) -> dict:
    """{config field: value} for the flags given (those left out are not in args)."""
    given = {UP_FIELDS[k]: v for k, v in vars(args).items() if k in UP_FIELDS}
    if "model.path" in given:
        given["model.path"] = str(Path(given["model.path"]).resolve())  # relative to here, not to the config
    for field in ("cache.prefix_caching", "server.ray_dashboard"):  # set by --no-... flags
        if field in given:
            given[field] = not given[field]
    if "topology.expert_placement" in given:
        given["topology.expert_placement"] = list(given["topology.expert_placement"])
    return given


def say(message: str) -> None:
    print(f"moe-serve: {message}", flush=True)


def cmd_up(args) -> int:
    """Loads the config, starts (or joins) Ray, deploys the Serve application, prints the endpoints, and serves
    until Ctrl-C."""
    from cluster.serve_config import ServeConfig

    config = ServeConfig.load(args.config, overrides(args))
    say(f"config {args.config or '(none): the tiny CPU default, as configs/tiny-cpu.yaml'}")
    if config.model.path is None:
        say("preparing the built-in tiny checkpoint (made on first use, then cached) ...")
    model = config.model.path or default_model()
    own_ray = args.address in (None, "local")
    if own_ray or Path(model).is_dir():  # before Ray: an error here takes seconds
        plan = config.check(preflight(model, config.model.random_weights))
    else:  # joining a cluster whose GPU nodes hold the weights: the replicas check them as they load
        say(f"note: {model} is not on this machine; its checkpoint is checked where the replicas load it")
        plan = None

    from cluster.direct_ingress import direct_ingress_env, proxy_ports, wait_until_bindable
    from cluster.serve_app import SERVE_ENV

    server = config.server
    direct = server.ingress in ("direct", "engine")
    if direct and not own_ray:
        raise config.error("server.ingress", f"{server.ingress} is set up in the Ray that `moe-serve up` starts; on "
                           "a cluster started elsewhere use proxy (or start its nodes with Serve's direct ingress "
                           "variables, cluster/direct_ingress.py)")
    if not server.ray_dashboard and not own_ray:
        raise config.error("server.ray_dashboard", "the dashboard is left out of the Ray that `moe-serve up` starts; "
                           "on a cluster started elsewhere, start its head with `ray start --include-dashboard=false`")
    if own_ray:  # for the Ray we start (its processes take our environment), unless set otherwise
        for name, value in SERVE_ENV.items():
            os.environ.setdefault(name, value)
    if direct:  # the ports must be the server's: these are not left to the environment
        os.environ.update(direct_ingress_env(server.http_port, server.grpc_port, config.replicas.router))
        try:
            waited = wait_until_bindable(server.host, server.http_port)
        except OSError as e:
            raise config.error("server.http_port", str(e)) from None
        if waited > 1:
            say(f"waited {waited:.0f} s for port {server.http_port}: a server stopped there just before")
    import ray
    from ray import serve

    from cluster import grpc_bind, malloc
    from cluster.serve_app import build_serve_app, grpc_options
    from cluster.status_board import remove_board

    if plan is not None:
        print(plan.describe(), flush=True)
    options = config.serve_options(model)
    say(f"starting Ray ({args.address or 'local'}) ...")
    # a Ray of our own gets the hook that binds Serve's gRPC proxy to the host (Serve has no option for it), and
    # its workers the allocator (on a cluster started elsewhere, the nodes' environment decides both)
    runtime_env = None
    if own_ray:
        runtime_env = grpc_bind.runtime_env(server.host)
        env, allocator = malloc.preload_env(config.resources.malloc)
        runtime_env["env_vars"].update(env)
        say(f"memory allocator of the workers: {allocator}")
    ray.init(address=args.address or "local", logging_level=logging.WARNING, runtime_env=runtime_env,
             include_dashboard=None if server.ray_dashboard else False)  # None: where Ray's dashboard is installed
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or a service manager's stop (even if started with
        signal.signal(sig, signal.default_int_handler)  # SIGINT ignored, as a background job is)
    try:
        http_port, grpc_port = proxy_ports(server.host) if direct else (server.http_port, server.grpc_port)
        serve.start(http_options={"host": server.host, "port": http_port}, grpc_options=grpc_options(grpc_port))
        say(f"deploying '{options.model_name}'; waiting for {options.initial_replicas} engine replica(s) to load "
            f"{model} ...")
        serve.run(build_serve_app(options), name="moe-serve", route_prefix="/")
        listener = {"proxy": "Serve's proxy", "direct": "the Ingress replica, direct",
                    "engine": "the engine replica, direct"}[server.ingress]
        say(f"serving '{options.model_name}' ({listener} on the ports)\n"
            f"  HTTP (OpenAI-compatible): http://{server.host}:{server.http_port}/v1\n"
            f"  gRPC (moe_serve.v1.MoeServe): {server.host}:{server.grpc_port}\n"
            f"`moe-serve status` shows the replicas (Ray at {ray.get_runtime_context().gcs_address}); "
            "Ctrl-C stops it.")
        if not own_ray and server.host not in ("0.0.0.0", "::") and not server.api_keys:
            say(f"note: on a Ray cluster started elsewhere, Serve's gRPC proxy listens on every interface (port "
                f"{server.grpc_port}); firewall that port or set --api-key")
        first_request(server, options.model_name)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        serve.shutdown()
        remove_board()
        ray.shutdown()
    return 0


def first_request(server, model_name: str) -> None:
    """Sends the server one real chat request over HTTP and prints it with its answer (and the curl to repeat it)."""
    import urllib.request

    host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
    url = f"http://{host}:{server.http_port}/v1/chat/completions"
    body = {"model": model_name, "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}]}
    headers = {"Content-Type": "application/json"}
    if server.api_keys:
        headers["Authorization"] = f"Bearer {server.api_keys[0]}"
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode(), headers), timeout=120) as r:
            reply = json.load(r)
    except OSError as e:
        say(f"the first request failed: {e}")
        return
    usage = reply["usage"]
    say(f"first request answered in {time.perf_counter() - t0:.2f} s ({usage['prompt_tokens']} prompt tokens, "
        f"{usage['completion_tokens']} generated):\n"
        f"  curl {url} -H 'Content-Type: application/json' -d '{json.dumps(body)}'\n"
        f"  -> {reply['choices'][0]['message']['content']!r}")


def cmd_status(args) -> int:
    """Prints the running cluster's Serve application, engine replicas with their caches, and actors per node."""
    import ray

    from cluster.cluster_status import ClusterStatus

    try:
        ray.init(address=args.address or "auto", logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as e:
        raise InputError(f"no running Ray cluster to show ({e}); start one with `moe-serve up` (a cluster with "
                         "token authentication needs RAY_AUTH_MODE=token with --address)") from None
    try:
        print(ClusterStatus.collect().render())
    finally:
        ray.shutdown()
    return 0


def add_engine_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--random-weights", action="store_true", help="random weights of the checkpoint's shapes")
    g.add_argument("--enforce-eager", action="store_true",
                   help="GPU: run decode steps eagerly instead of replaying captured CUDA graphs")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--stream-interval", type=int, default=1, metavar="K",
                   help="stream each request's tokens every K steps (its first and last at once); larger K means "
                        "fewer messages per token, burstier streams")
    g.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache budget on CPU")
    g.add_argument("--max-model-len", type=int, default=None, help="longest sequence (default: the model's)")
    g.add_argument("--no-prefix-caching", action="store_true", help="compute every prompt in full")
    g.add_argument("--attention-workers", type=int, default=1, metavar="A",
                   help="data-parallel attention worker processes, each with its own KV cache")
    g.add_argument("--expert-workers", type=int, default=0, metavar="E",
                   help="processes holding the routed experts, joined to the attention workers by all-to-all "
                        "(0: experts live with attention)")
    g.add_argument("--expert-placement", type=placement_list, default=None, metavar="W,W,...",
                   help="the expert worker of each routed expert, in expert order (default: contiguous ranges)")
    g.add_argument("--micro-batches", type=int, default=2,
                   help="micro-batches per step, ping-ponged against the expert workers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-serve", description="Serve DeepSeek-V2 and DeepSeek-Coder models.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="offline batch inference")
    g.add_argument("--model", required=True, help="local HF checkpoint directory")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one text prompt")
    src.add_argument("--input", help="JSONL file: {\"prompt\": ...} or {\"prompt_token_ids\": [...]} per line")
    g.add_argument("--output", help="JSONL file for the results (with --input)")
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)
    u = sub.add_parser("up", help="serve over HTTP (OpenAI-compatible) and gRPC on Ray Serve, until Ctrl-C",
                       description="Flags given override the config file's fields.")
    u.add_argument("config", nargs="?", default=None,
                   help="YAML config (configs/*.yaml; default: the tiny CPU model, as configs/tiny-cpu.yaml)")
    u.add_argument("--model", help="local HF checkpoint directory (model.path)")
    u.add_argument("--served-model-name", help="the model's name in the API (model.name)")
    u.add_argument("--engine-replicas", type=int, help="whole model instances behind the router (replicas.engine)")
    u.add_argument("--engine-cpus", type=float, help="Ray CPUs reserved per engine replica (resources.engine.cpus)")
    u.add_argument("--malloc", choices=["tcmalloc", "system"],
                   help="allocator of the Ray workers started here: tcmalloc where installed (resources.malloc)")
    u.add_argument("--host", help="address to listen on; 0.0.0.0 exposes the server (server.host)")
    u.add_argument("--ingress", choices=["proxy", "direct", "engine"],
                   help="who listens on the ports: Serve's proxy, the Ingress replicas directly, or the one engine "
                        "replica directly, with no separate Ingress (server.ingress)")
    u.add_argument("--no-ray-dashboard", action="store_true",
                   help="start Ray without its dashboard: fewer processes beside the model (server.ray_dashboard)")
    u.add_argument("--http-port", type=int)
    u.add_argument("--grpc-port", type=int)
    u.add_argument("--address", default=None,
                   help="an existing Ray cluster, 'auto' for the one `ray start` made here (default: a new local one)")
    u.add_argument("--api-key", action="append", help="require 'Authorization: Bearer KEY' (repeatable)")
    add_engine_args(u)
    for action in u._actions:  # a flag left out must not override the config with its default
        if action.dest in UP_FIELDS:
            action.default = argparse.SUPPRESS
    u.set_defaults(func=cmd_up)
    st = sub.add_parser("status", help="the running cluster: Serve replicas, engine caches, actors per node")
    st.add_argument("--address", default=None, help="the Ray cluster (default: the one running here)")
    st.set_defaults(func=cmd_status)
    t = sub.add_parser("tiny-checkpoint", help="write a tiny random checkpoint (for demos and tests)")
    t.add_argument("dir")
    t.add_argument("--kind", default="v2_lite", choices=list(SHAPES))
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tiny_checkpoint)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and args.output and not args.input:
        parser.error("--output needs --input")
    try:
        return args.func(args)
    except (InputError, ConfigError, CheckpointError, WorkerError, ValueError, FileNotFoundError) as e:
        print(f"moe-serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
