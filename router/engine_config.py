"""EngineConfig: the engine's knobs, passed down whole."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # local HF checkpoint directory
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"  # auto: cuda if available
    random_weights: bool = False
    seed: int = 0
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    kv_cache_gib: float = 1.0  # CPU cache budget
    gpu_memory_utilization: float = 0.85  # fraction of free GPU memory for the cache after loading

    def model_len(self, max_position_embeddings: int) -> int:
        return self.max_model_len or max_position_embeddings
