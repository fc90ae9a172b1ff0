"""Every GPU check and benchmark in one call (the GPU image has torch and transformers, not Ray).

    python benchmarks/gpu_check.py [--out DIR] [--parts tests,nccl,kernel,ours,eager,hf]

1. Tests on CUDA: the model against transformers (float32, tiny checkpoints), the Triton MLA decode kernel against
   the bmm form (float32 and bfloat16), the padded decode-graph step against the plain one, a captured graph's
   tokens against the eager engine's.
2. The all-to-all dispatcher on an NCCL group of world size 1 (tiny DeepSeek-V2, float32): the same code path the
   multi-process workers use must give the colocated model's greedy tokens (tests/dispatch_check.py).
3. The device-to-device copy bandwidth, for the roofline (benchmarks/roofline.py), and the MLA decode kernel alone
   over a sweep of its tile and launch settings (--kernel-cases), against that bandwidth.
4. Decode tokens/s of a DeepSeek-Coder-V2-Lite-shaped model (random bf16 weights) at each --cases batch and
   context: ours (CUDA graphs, the paged MLA kernel, torch._grouped_mm; first, a captured step's logits against
   the eager step's), ours without graphs (--eager-cases), and transformers (--hf-cases), each in its own process;
   beside each, the roofline and the fraction of it reached.
Prints the tables and writes gpu_check.json to --out after each part.
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
from benchmarks.roofline import roofline_tok_s

PARTS = ("tests", "nccl", "kernel", "ours", "eager", "hf")
BUDGET = 8192  # max_num_batched_tokens: prefill chunks of the benchmark's engine
TESTS = ["tests/test_model_vs_transformers.py", "tests/test_triton_mla_decode.py", "tests/test_decode_graphs.py"]


def parse_cases(text: str) -> list[tuple[int, int]]:
    """"1x1024,64x4096" -> [(batch, context), ...]."""
    cases = []
    for case in filter(None, text.split(",")):
        try:
            batch, context = (int(v) for v in case.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"case {case!r} is not BATCHxCONTEXT, e.g. 64x4096") from None
        if batch < 1 or context < 1:
            raise argparse.ArgumentTypeError(f"case {case!r}: batch and context must be at least 1")
        cases.append((batch, context))
    return cases


def decode_rate(eng, batch: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    """`batch` random prompts of prompt_len tokens; once every one is decoding, time new_tokens steps of the whole
    batch (each request may run longer than that, so none ends inside the window), then abort them all."""
    import torch

    from workers.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=max_tokens(batch, prompt_len, new_tokens, eng.config.max_num_batched_tokens),
                            temperature=0.0, ignore_eos=True)
    vocab = eng.executor.runner.model.config.vocab_size
    ids = [eng.add_request(torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), params)
           for _ in range(batch)]
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        started: set[str] = set()
        while not started.issuperset(ids):  # prefill: until every request has its first token
            started.update(o.request_id for o in eng.step())
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        tokens = 0
        for _ in range(new_tokens):
            outs = eng.step()
            assert len(outs) == batch and not any(o.finished for o in outs), "the batch shrank inside the window"
            tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    finally:  # a case that failed leaves nothing running into the next
        for request_id in ids:
            eng.abort(request_id)
    return {"batch": batch, "context": prompt_len, "new_tokens": new_tokens, "prefill_s": t1 - t0,
            "decode_steps": new_tokens, "decode_s": t2 - t1, "decode_tok_s": tokens / (t2 - t1)}


def max_tokens(batch: int, prompt_len: int, new_tokens: int, budget: int) -> int:
    """Enough tokens that the first request admitted still runs when the last has finished its prefill and
    new_tokens steps after (prefill takes about batch * prompt_len / budget steps; doubled, for the decodes that
    share each step's budget)."""
    return new_tokens + 2 * -(-batch * prompt_len // budget) + 16


def graphs_agree(eng) -> dict:
    """One decode step of 5 sequences through the captured graph (padded to 8) and eagerly: logits' difference."""
    from tests.harness import decode_chunks, random_prompts

    runner = eng.executor.runner
    prompts = random_prompts([17, 300, 5, 64, 1000], seed=9, vocab=100000)
    assert len(prompts) <= runner.graphs.max_batch, "the check's batch must go through a graph"
    decode = decode_chunks(eng, prompts, first_token=7)  # 64 tokens: the decode token opens a block
    graphed = runner.forward_logits(decode).clone()  # [5, V]
    graphs, runner.graphs = runner.graphs, None
    try:
        eager = runner.forward_logits(decode)
    finally:
        runner.graphs = graphs
    return {"max_abs_diff": (graphed - eager).abs().max().item(), "max_abs_logit": eager.abs().max().item(),
            "same_argmax": bool((graphed.argmax(-1) == eager.argmax(-1)).all())}


def part_ours(cases: list[tuple[int, int]], new_tokens: int, eager: bool) -> dict:
    import torch

    from router.engine_config import EngineConfig
    from router.llm_engine import LLMEngine
    from workers.grouped_mm import torch_grouped_mm
    from workers.mla_decode import paged_mla_decode

    t0 = time.perf_counter()
    eng = LLMEngine.from_config(EngineConfig(
        model=str(LITE), dtype="bfloat16", device="cuda", random_weights=True, enforce_eager=eager,
        max_num_seqs=max(8, *(b for b, _ in cases)),  # graphs_agree's 5 sequences, padded to 8
        max_model_len=max(1100, *(c + max_tokens(b, c, new_tokens, BUDGET) for b, c in cases)),  # and its 1000
        max_num_batched_tokens=BUDGET, enable_prefix_caching=False))  # the warm-up's prompts are the same
    load_s = time.perf_counter() - t0
    runner = eng.executor.runner
    layer = runner.model.model.layers[1]
    report = {"impl": "ours (eager)" if eager else "ours", "load_s": load_s,
              "grouped_mm": layer.mlp.experts.grouped_mm is torch_grouped_mm,
              "paged_mla_kernel": layer.self_attn.mla_decode is paged_mla_decode,
              "cuda_graphs": runner.graphs is not None, "kv_blocks": runner.kv_cache.num_blocks, "cases": []}
    if runner.graphs is not None:
        report["graphs_vs_eager"] = graphs_agree(eng)
    decode_rate(eng, 4, 64, 4, seed=1)  # warm-up
    for i, (batch, context) in enumerate(cases):
        try:
            report["cases"].append(decode_rate(eng, batch, context, new_tokens, seed=2 + i))
        except Exception as e:  # noqa: BLE001 -- out of memory, or the batch shrank: an error row, the rest still run
            report["cases"].append({"batch": batch, "context": context, "error": f"{type(e).__name__}: {e}"[:300]})
            torch.cuda.empty_cache()
    report["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return report


def part_hf(cases: list[tuple[int, int]], new_tokens: int, eager: bool) -> dict:
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

    def run(ids, n):
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():  # the mask says every token is real (else those equal to pad_token_id count as padding)
            model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    report = {"impl": f"transformers {transformers.__version__}", "load_s": load_s,
              "experts_impl": str(getattr(config, "_experts_implementation", None)), "cases": []}
    run(torch.randint(0, 100000, (1, 64), generator=g).cuda(), 4)  # warm-up
    for batch, context in cases:
        ids = torch.randint(0, 100000, (batch, context), generator=g).cuda()
        try:
            t_first = run(ids, 1)
            t_all = run(ids, new_tokens)
            report["cases"].append({"batch": batch, "context": context, "new_tokens": new_tokens,
                                    "prefill_s": t_first, "decode_s": t_all - t_first,
                                    "decode_tok_s": batch * (new_tokens - 1) / (t_all - t_first)})
        except torch.OutOfMemoryError as e:
            report["cases"].append({"batch": batch, "context": context, "error": f"out of memory: {e}"[:300]})
        del ids
        torch.cuda.empty_cache()
    report["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return report


def kernel_sweep(cases: list[tuple[int, int]]) -> list[dict]:
    """The MLA decode kernel alone on Lite's shapes (16 heads, latent 512 + rope 64, bf16, 16-token pages, each
    sequence's blocks scattered): microseconds per call and the cache bytes it reads per second, for each tile and
    launch setting."""
    import functools
    import itertools

    import torch

    from workers.triton_mla_decode import triton_mla_decode

    H, L, R, page = 16, 512, 64, 16
    rows = []
    for batch, context in cases:
        torch.manual_seed(0)
        blocks = -(-context // page)
        cache = torch.randn(batch * blocks + 1, page, L + R, device="cuda", dtype=torch.bfloat16)  # [N, page, L+R]
        tables = torch.randperm(batch * blocks, device="cuda").view(batch, blocks)  # [B, M] scattered blocks
        lens = torch.full((batch,), context, device="cuda")  # [B]
        q = torch.randn(batch, H, L + R, device="cuda", dtype=torch.bfloat16)  # [B, H, L+R]
        read = batch * context * (L + R) * 2
        for block_n, warps, stages in itertools.product((16, 32, 64), (4, 8), (1, 2, 3)):
            row = {"batch": batch, "context": context, "block_n": block_n, "num_warps": warps, "num_stages": stages}
            try:
                call = functools.partial(triton_mla_decode, q, cache, tables, lens, 0.1, L, block_n, warps, stages)
                call()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    call()
                stop.record()
                stop.synchronize()
                seconds = start.elapsed_time(stop) / 1e3 / 20
                row.update(us=seconds * 1e6, cache_gb_s=read / seconds / 1e9)
            except Exception as e:  # noqa: BLE001 -- a setting that does not compile (shared memory): say so
                row["error"] = str(e)[:200]
            rows.append(row)
        del cache, tables, q
        torch.cuda.empty_cache()
    return rows


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written (the median of 10 copies of
    2 GiB)."""
    import statistics

    import torch

    a = torch.empty(2**30, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(13):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    nbytes = 2 * a.numel() * a.element_size()
    del a, b
    torch.cuda.empty_cache()
    return nbytes / statistics.median(times[3:])


def part_nccl() -> dict:
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


def text_of(stream: str | bytes | None) -> str:
    """TimeoutExpired carries what the child wrote as bytes (or None), whatever text= was."""
    return stream.decode(errors="replace") if isinstance(stream, bytes) else stream or ""


def run_part(name: str, args, cases: str, eager: bool = False) -> dict:
    label = "ours (eager)" if eager else name
    cmd = [sys.executable, __file__, "--part", name, "--cases", cases, "--new-tokens", str(args.new_tokens)]
    try:
        proc = subprocess.run(cmd + (["--eager"] if eager else []), capture_output=True, text=True,
                              timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired as e:
        stderr = text_of(e.stderr)
        sys.stderr.write(stderr[-4000:])
        return {"impl": label, "error": f"timed out after {args.timeout} s; stderr: {stderr[-1200:]}", "cases": []}
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        return {"impl": label, "error": proc.stderr[-1500:], "cases": []}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(title: str, reports: list[dict], config: dict, bandwidth: float) -> None:
    print(f"\n{title}")
    print(f"{'impl':<28}{'batch':>6}{'context':>8}{'decode tok/s':>14}{'roofline':>10}{'of roofline':>13}")
    for r in reports:
        if "error" in r:
            print(f"{r['impl']:<28} ERROR {r['error'][-400:]}")
        for c in r["cases"]:
            roof = roofline_tok_s(config, c["batch"], c["context"], bandwidth)
            if "error" in c:
                print(f"{r['impl']:<28}{c['batch']:>6}{c['context']:>8}  {c['error'][:60]}")
            else:
                print(f"{r['impl']:<28}{c['batch']:>6}{c['context']:>8}{c['decode_tok_s']:>14.1f}{roof:>10.0f}"
                      f"{c['decode_tok_s'] / roof:>12.0%}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["ours", "hf", "nccl"])
    ap.add_argument("--cases", default="1x1024,1x4096,64x1024,64x4096,256x1024,256x4096",
                    help="decode cases, BATCHxCONTEXT, comma-separated")
    ap.add_argument("--eager-cases", default="1x1024,64x1024", help="ours without CUDA graphs, for comparison")
    ap.add_argument("--kernel-cases", default="1x4096,64x4096,256x4096", help="the kernel sweep's cases")
    ap.add_argument("--hf-cases", default="1x1024,1x4096,64x1024", help="transformers (its cache is expanded K/V)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--timeout", type=int, default=540)
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"which to run, comma-separated (default all: {','.join(PARTS)}); e.g. two calls, "
                         "tests,nccl,kernel then ours,eager,hf, where one would pass the 10-minute limit")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    try:  # every case list checked before any part runs
        for text in (args.cases, args.eager_cases, args.kernel_cases, args.hf_cases):
            parse_cases(text)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.part == "nccl":
        print(json.dumps(part_nccl()))
        return 0
    if args.part:
        fn = {"ours": part_ours, "hf": part_hf}[args.part]
        print(json.dumps(fn(parse_cases(args.cases), args.new_tokens, args.eager)))
        return 0

    import torch

    parts = set(filter(None, args.parts.split(",")))
    if parts - set(PARTS):
        ap.error(f"unknown parts {sorted(parts - set(PARTS))}; known: {','.join(PARTS)}")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "parts": sorted(parts)}
    out = Path(args.out) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part, so a run cut short keeps what it measured
        out.write_text(json.dumps(report, indent=2))

    if "tests" in parts:
        env = dict(os.environ, MOE_SERVE_TEST_DEVICE="cuda", PYTHONPATH=str(ROOT))
        try:
            t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                                *TESTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout,
                               check=False)
            print(t.stdout[-3000:], t.stderr[-2000:])
            report["tests_on_cuda"] = t.stdout.strip().splitlines()[-1] if t.stdout.strip() else t.stderr[-500:]
        except subprocess.TimeoutExpired as e:
            print(text_of(e.stdout)[-3000:], text_of(e.stderr)[-2000:])
            report["tests_on_cuda"] = f"timed out after {args.timeout} s"
        save()
    if "nccl" in parts:
        report["nccl_dispatch"] = run_part("nccl", args, "")
        print(f"all-to-all dispatcher, NCCL world size 1: {report['nccl_dispatch']}")
        save()
    report["copy_bandwidth"] = bandwidth = copy_bandwidth()
    print(f"\ndevice-to-device copy bandwidth (read + written): {bandwidth / 1e9:.0f} GB/s")
    if "kernel" in parts:
        report["kernel_sweep"] = sweep = kernel_sweep(parse_cases(args.kernel_cases))
        print("\nMLA decode kernel alone (bf16, Lite's heads and widths)")
        print(f"{'batch':>6}{'context':>8}{'BN':>4}{'warps':>6}{'stages':>7}{'us':>9}{'cache GB/s':>12}")
        for r in sweep:
            tail = f"{r['us']:>9.1f}{r['cache_gb_s']:>12.0f}" if "us" in r else f"  {r['error'][:60]}"
            print(f"{r['batch']:>6}{r['context']:>8}{r['block_n']:>4}{r['num_warps']:>6}{r['num_stages']:>7}{tail}")
        save()
    report["decode"] = []
    for part, name, cases, eager in (("ours", "ours", args.cases, False), ("eager", "ours", args.eager_cases, True),
                                     ("hf", "hf", args.hf_cases, False)):
        if part in parts:
            report["decode"].append(run_part(name, args, cases, eager))
            print({k: v for k, v in report["decode"][-1].items() if k != "cases"})
            save()
    if report["decode"]:
        print_table(f"{report['device']}, torch {report['torch']}: DeepSeek-Coder-V2-Lite shape, random bf16 "
                    f"weights, {args.new_tokens} decode tokens after a prompt of the context's length; roofline: "
                    f"the step's weight and cache bytes at the measured copy bandwidth, {bandwidth / 1e12:.2f} TB/s",
                    report["decode"], json.loads((LITE / "config.json").read_text()), bandwidth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
