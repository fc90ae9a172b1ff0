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
    enforce_eager: bool = False  # GPU: run decode steps eagerly instead of replaying captured CUDA graphs
    attention_workers: int = 1  # data-parallel attention ranks, each with its own sequences and cache
    expert_workers: int = 0  # processes holding the routed experts; 0: experts live with attention (colocated)
    expert_placement: tuple[int, ...] | None = None  # expert id -> expert worker; default: contiguous ranges
    micro_batches: int = 2  # per step and attention rank, ping-ponged against the experts (with expert workers)
    worker_threads: int | None = None  # torch threads per worker process; default: the CPUs shared out
    stream_interval: int = 1  # steps between a request's streamed outputs (its first and last go out at once)
    max_waiting: int = 1024  # queued sequences beyond which new requests are refused as busy (HTTP 429)
    session_cache_fraction: float = 0.5  # of each rank's cache blocks, at most this much pinned for sessions
    session_ttl_s: float = 1800.0  # a session's pinned history is let go after this long without a turn

    def __post_init__(self):
        if self.attention_workers < 1:
            raise ValueError(f"attention_workers must be at least 1, not {self.attention_workers}")
        if self.expert_workers < 0:
            raise ValueError(f"expert_workers must be 0 (colocated) or more, not {self.expert_workers}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, not {self.stream_interval}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, not {self.micro_batches}")
        if not 0.0 <= self.session_cache_fraction <= 1.0:
            raise ValueError(f"session_cache_fraction must be in [0, 1], not {self.session_cache_fraction}")
        if self.expert_placement is not None and not self.expert_workers:
            raise ValueError("an expert placement needs expert workers (--expert-workers)")

    @property
    def multiprocess(self) -> bool:
        return self.attention_workers > 1 or self.expert_workers > 0

    def model_len(self, max_position_embeddings: int) -> int:
        return self.max_model_len or max_position_embeddings
