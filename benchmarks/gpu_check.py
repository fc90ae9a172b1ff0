"""Every GPU check and benchmark in one call (the GPU image has torch and transformers, not Ray).

    python benchmarks/gpu_check.py [--out DIR]

1. The model-vs-transformers tests on CUDA (float32, tiny checkpoints).
2. The all-to-all dispatcher on an NCCL group of world size 1 (tiny DeepSeek-V2, float32): the same code path the
   multi-process workers use must give the colocated model's greedy tokens (tests/dispatch_check.py).
3. Batch-1 decode of a DeepSeek-Coder-V2-Lite-shaped model (--random-weights, bfloat16): ours, then transformers
   in a separate process, same prompt length and output length.
4. Colocated single-GPU throughput on the same model: decode tokens/s at --throughput-batches.
Prints tables and writes gpu_check.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LITE = ROOT / "benchmarks" / "shapes" / "deepseek-coder-v2-lite"
sys.path.insert(0, str(ROOT))


def part_ours(prompt_len: int, new_tokens: int, batch: int) -> dict:
    import torch

    from router.engine_config import EngineConfig
    from router.llm_engine import LLMEngine
    from workers.grouped_mm import torch_grouped_mm
    from workers.sampling_params import SamplingParams

    t0 = time.perf_counter()
    eng = LLMEngine.from_config(EngineConfig(model=str(LITE), dtype="bfloat16", device="cuda", random_weights=True,
                                             max_num_seqs=max(batch, 1), max_model_len=8192,
                                             enable_prefix_caching=False))  # the warm-up's prompts are the same
    load_s = time.perf_counter() - t0
    experts = eng.executor.runner.model.model.layers[1].mlp.experts
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 100000, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    eng.generate(prompts, [SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)] * batch)  # warm-up
    torch.cuda.synchronize()
    for p in prompts:
        eng.add_request(p, params)
    t0 = time.perf_counter()
    started: set[str] = set()
    out_tokens = 0
    while len(started) < batch:  # prefill: until every request has its first token
        for o in eng.step():
            started.add(o.request_id)
            out_tokens += sum(len(c.token_ids) for c in o.outputs)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    decode_from = out_tokens
    steps = 0
    while eng.has_unfinished():
        out_tokens += sum(len(c.token_ids) for o in eng.step() for c in o.outputs)
        steps += 1
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return {"impl": "ours", "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "load_s": load_s,
            "prefill_s": t1 - t0, "decode_steps": steps, "decode_s": t2 - t1,
            "decode_tok_s": (out_tokens - decode_from) / (t2 - t1), "grouped_mm": experts.grouped_mm is torch_grouped_mm,
            "kv_blocks": eng.executor.runner.kv_cache.num_blocks, "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def part_hf(prompt_len: int, new_tokens: int, batch: int) -> dict:
    import torch
    import transformers
    from transformers import AutoConfig, DeepseekV2ForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(LITE))
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = DeepseekV2ForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100000, (batch, prompt_len), generator=g).cuda()

    def run(n):
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, generation_config=cfg)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(4)  # warm-up
    t_first = run(1)
    t_all = run(new_tokens)
    return {"impl": f"transformers {transformers.__version__}", "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "load_s": load_s, "prefill_s": t_first, "decode_s": t_all - t_first,
            "decode_tok_s": batch * (new_tokens - 1) / (t_all - t_first),
            "experts_impl": str(getattr(config, "_experts_implementation", None)),
            "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def part_nccl(prompt_len: int, new_tokens: int, batch: int) -> dict:
    import tempfile

    from cluster.tiny_checkpoint import make_checkpoint
    from tests.dispatch_check import world_size_one
    from tests.harness import random_prompts

    with tempfile.TemporaryDirectory() as d:
        model_dir = str(make_checkpoint("v2_lite", Path(d)))
        out = world_size_one(model_dir, "cuda", "float32", random_prompts([7, 30, 2, 64], seed=3))
    return {"impl": "all-to-all, world size 1", "backend": out["backend"],
            "same_tokens_as_local": out["all_to_all"] == out["local"],
            "copies_through_all_to_all": out["copies_through_all_to_all"]}


def run_part(name: str, args, batch: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--part", name, "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--batch", str(batch or args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        return {"impl": name, "error": proc.stderr[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["ours", "hf", "nccl"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--throughput-batches", default="64,256")
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.part:
        fn = {"ours": part_ours, "hf": part_hf, "nccl": part_nccl}[args.part]
        print(json.dumps(fn(args.prompt_len, args.new_tokens, args.batch)))
        return 0

    import torch

    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if not args.skip_tests:
        env = dict(os.environ, MOE_SERVE_TEST_DEVICE="cuda", PYTHONPATH=str(ROOT))
        t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                            "tests/test_model_vs_transformers.py"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=args.timeout)
        print(t.stdout[-3000:], t.stderr[-2000:])
        report["tests_on_cuda"] = t.stdout.strip().splitlines()[-1] if t.stdout.strip() else t.stderr[-500:]
    report["nccl_dispatch"] = run_part("nccl", args)
    print(f"all-to-all dispatcher, NCCL world size 1: {report['nccl_dispatch']}")
    report["decode"] = [run_part("ours", args), run_part("hf", args)]
    print(f"\n{report['device']}, torch {report['torch']}: DeepSeek-Coder-V2-Lite shape, random bf16 weights, "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"{'impl':<24}{'load s':>8}{'prefill s':>11}{'decode tok/s':>14}{'max GiB':>9}")
    for r in report["decode"]:
        if "error" in r:
            print(f"{r['impl']:<24} ERROR {r['error'][-300:]}")
        else:
            print(f"{r['impl']:<24}{r['load_s']:>8.1f}{r['prefill_s']:>11.3f}{r['decode_tok_s']:>14.1f}"
                  f"{r['max_mem_gib']:>9.1f}")
    report["throughput"] = [run_part("ours", args, int(b)) for b in args.throughput_batches.split(",")]
    print(f"\ncolocated single-GPU throughput, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"{'batch':>6}{'prefill s':>11}{'decode tok/s':>14}{'max GiB':>9}")
    for r in report["throughput"]:
        if "error" in r:
            print(f"{'':>6} ERROR {r['error'][-300:]}")
        else:
            print(f"{r['batch']:>6}{r['prefill_s']:>11.3f}{r['decode_tok_s']:>14.1f}{r['max_mem_gib']:>9.1f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
