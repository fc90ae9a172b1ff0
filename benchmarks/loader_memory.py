"""Peak RSS of loading a >= 1 GB random checkpoint, against the checkpoint's size.

    python benchmarks/loader_memory.py [--dir /tmp/moe-serve-1g] [--keep]

Makes the checkpoint once with transformers (sharded safetensors, float32), then loads it in fresh processes: ours
(float32 on CPU) and, for reference, transformers' from_pretrained. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
             num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
             n_routed_experts=32, num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=4096,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process image; unlike ru_maxrss, VmHWM is not inherited over fork+exec."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make(out: Path) -> None:
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    DeepseekV2ForCausalLM(DeepseekV2Config(**SHAPE)).save_pretrained(str(out), max_shard_size="400MB")


def load(which: str, model_dir: Path) -> dict:
    import torch

    before = status_mib("VmRSS")
    t0 = time.perf_counter()
    if which == "ours":
        from workers.causal_lm import CausalLM
        from workers.checkpoint import Checkpoint
        from workers.config import ModelConfig
        from workers.loader import build_model

        model = build_model(CausalLM, ModelConfig.from_pretrained(model_dir), torch.device("cpu"), torch.float32,
                            Checkpoint(model_dir))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = status_mib("VmHWM")
    return {"which": which, "baseline_mib": before, "peak_mib": peak, "params_mib": params / 2**20, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/moe-serve-1g")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--part", choices=["make", "ours", "transformers"])
    args = ap.parse_args()
    d = Path(args.dir)
    if args.part == "make":
        make(d)
        return 0
    if args.part:
        print(json.dumps(load(args.part, d)))
        return 0
    if not (d / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--dir", str(d), "--part", "make"], check=True)
    size = sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20
    rows = []
    for which in ("ours", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--dir", str(d), "--part", which], capture_output=True,
                             text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"checkpoint: {size:.0f} MiB in {len(list(d.glob('*.safetensors')))} safetensors shards (float32)")
    print(f"{'loader':<14}{'peak RSS MiB':>14}{'x ckpt':>8}{'RSS before MiB':>16}{'peak-before x ckpt':>20}{'s':>7}")
    for r in rows:
        print(f"{r['which']:<14}{r['peak_mib']:>14.0f}{r['peak_mib'] / size:>8.2f}{r['baseline_mib']:>16.0f}"
              f"{(r['peak_mib'] - r['baseline_mib']) / size:>20.2f}{r['seconds']:>7.1f}")
    if not args.keep:
        shutil.rmtree(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
