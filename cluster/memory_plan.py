"""MemoryPlan: what each GPU process of a topology holds, from the model's shapes, and whether it fits.

Weights are counted on the meta device from the very modules the workers build: the attention side (embeddings,
attention, dense MLPs, gates, shared experts, lm_head, and every routed expert when colocated) and each expert
worker's share of the routed experts. The KV cache gets `gpu_memory_utilization` of what the weights and the CUDA
context leave, as workers/model_runner.py sizes it; the rest is for activations. A plan fits when every process's
weights fit its GPU and every attention-side cache holds one sequence of max_model_len tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from router.engine_config import EngineConfig
from workers.causal_lm import CausalLM
from workers.config import ModelConfig, resolve_dtype
from workers.expert_shard import ExpertShard
from workers.kv_cache import bytes_per_token
from workers.multiproc_executor import placement_for

CUDA_CONTEXT_BYTES = 10**9  # per process: the CUDA context and allocator slack (an estimate)
GB = 1e9


@dataclass(frozen=True)
class WorkerMemory:
    name: str  # "engine replica", "attention worker 0", "expert worker 3"
    weight_bytes: int
    cache_tokens: int | None  # None: no KV cache (an expert worker)
    remedy: str  # what to change when its weights do not fit


@dataclass(frozen=True)
class MemoryPlan:
    workers: tuple[WorkerMemory, ...]
    gpu_bytes: int
    dtype: torch.dtype
    kv_bytes_per_token: int
    max_model_len: int

    @classmethod
    def build(cls, engine: EngineConfig, model: ModelConfig, gpu_bytes: int) -> "MemoryPlan":
        """One GPU of gpu_bytes per process: the engine replica when colocated, else each worker."""
        dtype = resolve_dtype(engine.dtype, torch.device("cuda"))
        per_token = bytes_per_token(model, dtype)
        placement = placement_for(engine, model)
        attention = weight_bytes(dtype, CausalLM, model, expert_ids=None if placement is None else ())
        free = gpu_bytes - CUDA_CONTEXT_BYTES - attention
        tokens = max(0, int(free * engine.gpu_memory_utilization)) // per_token
        if placement is None and model.n_routed_experts:
            remedy = "move the routed experts to expert workers (topology.expert_workers)"
        else:
            remedy = "the attention side must fit one GPU (there is no tensor parallelism)"
        names = [f"attention worker {r}" for r in range(engine.attention_workers)] if engine.multiprocess \
            else ["engine replica"]
        workers = [WorkerMemory(name, attention, tokens, remedy) for name in names]
        for w in range(engine.expert_workers):
            experts = weight_bytes(dtype, ExpertShard, model, expert_ids=placement.experts_of(w))
            workers.append(WorkerMemory(f"expert worker {w}", experts, None, "use more expert workers"))
        return cls(tuple(workers), gpu_bytes, dtype, per_token, engine.model_len(model.max_position_embeddings))

    @property
    def problems(self) -> list[str]:
        out = []
        for w in self.workers:
            if w.weight_bytes + CUDA_CONTEXT_BYTES > self.gpu_bytes:
                out.append(f"{w.name}: {w.weight_bytes / GB:.1f} GB of weights do not fit on one "
                           f"{self.gpu_bytes / GB:.0f} GB GPU (with {CUDA_CONTEXT_BYTES / GB:.0f} GB for the CUDA "
                           f"context): {w.remedy}")
            elif w.cache_tokens is not None and w.cache_tokens < self.max_model_len:
                out.append(f"{w.name}: its KV cache holds {w.cache_tokens} tokens, less than one "
                           f"{self.max_model_len}-token sequence; lower max_model_len or raise "
                           "gpu_memory_utilization")
        return out

    @property
    def fits(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [f"memory plan ({self.gpu_bytes / GB:.0f} GB GPUs, {dtype}, "
                 f"KV cache {self.kv_bytes_per_token / 1e3:.1f} KB/token):"]
        for w in self.workers:
            cache = "" if w.cache_tokens is None else \
                f", KV cache {w.cache_tokens * self.kv_bytes_per_token / GB:.1f} GB = {w.cache_tokens:,} tokens"
            lines.append(f"  {w.name}: weights {w.weight_bytes / GB:.1f} GB{cache}")
        return "\n".join(lines + [f"  does not fit: {p}" for p in self.problems])


def weight_bytes(dtype: torch.dtype, cls, model: ModelConfig, **kwargs) -> int:
    """The parameters of `cls(model, **kwargs)` in dtype, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        module = cls(model, **kwargs)
    return sum(p.numel() for p in module.parameters()) * dtype.itemsize
