"""Long prompts on a tiny DeepSeek-V2 model: time and peak memory of one request, in a fresh process per length.

    python benchmarks/long_prompt.py [--lengths 8192 16384 32768] [--work DIR]

Each run prefills a random prompt in 2048-token chunks over the paged latent cache and greedily decodes 16 tokens.
The cache budget is what the prompt needs, so the peak shows the working memory of attention: with tiled prefill
it stays flat as the prompt grows, where materialized scores would need H x T^2 x 4 bytes per layer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
import torch
from router.engine_config import EngineConfig
from router.llm_engine import LLMEngine
from workers.config import ModelConfig
from workers.kv_cache import bytes_per_token
from workers.sampling_params import SamplingParams

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

model, n = sys.argv[1], int(sys.argv[2])
per_token = bytes_per_token(ModelConfig.from_pretrained(model), torch.float32)
eng = LLMEngine.from_config(EngineConfig(model=model, dtype="float32", device="cpu", max_model_len=n + 16,
                                         kv_cache_gib=(n + 64) * per_token / 2**30, max_num_seqs=1))
prompt = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0)).tolist()
before = rss_mib()
t = time.perf_counter()
(out,) = eng.generate([prompt], [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)])
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens": n, "seconds": seconds, "rss_before": before, "peak": peak,
                  "generated": len(out.outputs[0].token_ids), "finish": out.outputs[0].finish_reason}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    from cluster.tiny_checkpoint import SHAPES, make_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="long-prompt-"))
    model = work / "v2_lite"
    if not (model / "config.json").exists():
        make_checkpoint("v2_lite", model)
    shape = SHAPES["v2_lite"][1]
    heads = shape["num_attention_heads"]
    print("| prompt tokens | seconds | RSS before MiB | peak RSS MiB | peak − before MiB "
          "| full T×T scores, one layer, MiB | generated |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for n in args.lengths:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(n)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {n} | {r['seconds']:.1f} | {r['rss_before']:.0f} | {r['peak']:.0f} | "
              f"{r['peak'] - r['rss_before']:.0f} | {heads * n * n * 4 / 2**20:.0f} | "
              f"{r['generated']} ({r['finish']}) |", flush=True)


if __name__ == "__main__":
    main()
