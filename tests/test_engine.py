"""The engine's batching changes nothing: same tokens batched, alone, chunked or preempted."""

import torch

from tests.harness import engine, generate_tokens, random_prompts
from workers.config import ModelConfig
from workers.kv_cache import bytes_per_token


def test_batched_equals_alone_with_chunking_and_preemption(checkpoint_dir):
    d = checkpoint_dir("v2_236b")
    prompts = random_prompts([3, 50, 21, 90, 7, 64], seed=9)
    alone = [generate_tokens(engine(d), [p])[0] for p in prompts]
    # 24 blocks of 16 tokens cannot hold all six sequences at full length: decode must preempt
    block_bytes = bytes_per_token(ModelConfig.from_pretrained(d), torch.float32) * 16
    tight = engine(d, kv_cache_gib=24 * block_bytes / 2**30, max_num_batched_tokens=40)
    assert tight.runner.kv_cache.num_blocks == 24
    batched = generate_tokens(tight, prompts)
    assert tight.scheduler.num_preemptions > 0
    assert batched == alone
    assert tight.scheduler.blocks.usage == 0.0  # every block returned
