"""The all-to-all dispatcher's code path in one process (world size 1: the rank is both attention and experts).

Shared by the test suite (gloo, CPU) and benchmarks/gpu_check.py (NCCL, CUDA): the same model run through
`AllToAllDispatcher` must give the tokens of the colocated `LocalDispatcher` model.
"""

from __future__ import annotations

import torch.distributed as dist

from router.engine_config import EngineConfig
from router.llm_engine import LLMEngine
from workers.all_to_all_dispatcher import AllToAllDispatcher
from workers.config import ModelConfig, resolve_device
from workers.executor import LocalExecutor
from workers.expert_placement import ExpertPlacement
from workers.model_runner import build_runner
from workers.multiproc_executor import free_port
from workers.parallel_groups import backend_for, single_rank_groups
from workers.sampling_params import SamplingParams


def world_size_one(model_dir: str, device: str, dtype: str, prompts: list[list[int]], max_tokens: int = 12) -> dict:
    """Greedy tokens through the all-to-all path (2 micro-batches) and through the local one, and the backend."""
    config = EngineConfig(model=model_dir, device=device, dtype=dtype, kv_cache_gib=0.05)
    model_config = ModelConfig.from_pretrained(model_dir)
    dev = resolve_device(device)
    groups = single_rank_groups(f"tcp://127.0.0.1:{free_port()}", dev)
    try:
        placement = ExpertPlacement.contiguous(model_config.n_routed_experts, 1)
        dispatcher = AllToAllDispatcher(groups, placement, dev)
        runners = {"all_to_all": build_runner(config, model_config, dispatcher, micro_batches=2),
                   "local": build_runner(config, model_config)}
        params = [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)] * len(prompts)
        tokens = {name: [o.outputs[0].token_ids for o in
                         LLMEngine(config, model_config, LocalExecutor(runner)).generate(prompts, params)]
                  for name, runner in runners.items()}
        received = sum(int(row.sum()) for row in dispatcher.stats.received.values())
        return {**tokens, "backend": dist.get_backend(groups.ep), "expected_backend": backend_for(dev),
                "copies_through_all_to_all": received}
    finally:
        dist.destroy_process_group()
