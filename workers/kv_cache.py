"""KVCache: the paged cache tensors of every layer.

DeepSeek-V2 keeps per token and layer only the compressed latent and the rope key:
[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]. Llama keeps K and V heads:
[num_blocks, block_size, 2, num_key_value_heads, head_dim].
"""

from __future__ import annotations

import torch

from workers.config import ModelConfig


def entry_shape(config: ModelConfig) -> tuple[int, ...]:
    if config.is_mla:
        return (config.kv_lora_rank + config.qk_rope_head_dim,)
    return (2, config.num_key_value_heads, config.head_dim)


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    per_layer = 1
    for d in entry_shape(config):
        per_layer *= d
    return per_layer * config.num_hidden_layers * torch.empty((), dtype=dtype).element_size()


class KVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pad_block = num_blocks  # one block more, never handed out: a padded batch's extra rows use it
        shape = (num_blocks + 1, block_size, *entry_shape(config))
        self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]

    @classmethod
    def from_budget(cls, config: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype,
                    device: torch.device, max_blocks: int) -> "KVCache":
        """As many blocks as fit in budget_bytes, but no more than max_blocks (more would never be used)."""
        per_block = bytes_per_token(config, dtype) * block_size
        num_blocks = min(budget_bytes // per_block, max_blocks)
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget of {budget_bytes} bytes holds no {block_size}-token block")
        return cls(config, num_blocks, block_size, dtype, device)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size
