"""CausalLM: DeepSeek-V2 (MLA + DeepSeekMoE) or Llama (dense DeepSeek-Coder) over flat token batches.

Parameter names follow the published checkpoints (`model.layers.{i}.self_attn.kv_b_proj.weight`, ...), so the
generic loader maps names with the small table in `weight_target`.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Sequence

import torch
from torch import nn

from workers.attention_metadata import AttentionMetadata
from workers.config import ModelConfig
from workers.decoder_layer import DecoderLayer
from workers.dispatcher import Dispatcher
from workers.experts import Experts
from workers.grouped_mm import GroupedMM, looped_grouped_mm
from workers.kv_cache import KVCache
from workers.llama_attention import LlamaAttention
from workers.local_dispatcher import LocalDispatcher
from workers.mla_attention import MLAAttention
from workers.mla_decode import MLADecode, torch_mla_decode
from workers.mlp import MLP
from workers.moe import MoE
from workers.rms_norm import RMSNorm
from workers.rotary_embedding import RotaryEmbedding

EXPERT_NAME = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
FUSED = {"llama": ((".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"), (".v_proj.", ".qkv_proj.", "v"))}
FUSED_MLP = ((".gate_proj.", ".gate_up_proj.", "gate"), (".up_proj.", ".gate_up_proj.", "up"))


def run_interleaved(stages: list[Generator]) -> list:
    """Drives micro-batches' forward passes in turn, one MoE layer at a time (ping-pong): while one micro-batch's
    tokens are at the experts, the next one computes. Returns each generator's result."""
    results: list = [None] * len(stages)
    live = list(enumerate(stages))
    while live:
        still = []
        for i, gen in live:
            try:
                next(gen)
                still.append((i, gen))
            except StopIteration as done:
                results[i] = done.value
        live = still
    return results


def weight_target(architecture: str, name: str) -> tuple[str, object]:
    """Checkpoint tensor name -> (our parameter name, shard key or None)."""
    m = EXPERT_NAME.match(name)
    if m:
        prefix, expert, proj = m.groups()
        return f"{prefix}.{'w2' if proj == 'down' else 'w13'}", (int(expert), proj)
    for old, new, shard in FUSED.get(architecture, ()) + FUSED_MLP:
        if old in name:
            return name.replace(old, new), shard
    return name, None


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, layers: list[DecoderLayer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, expert_ids: Sequence[int] | None = None,
                 dispatcher: Dispatcher | None = None, grouped_mm: GroupedMM = looped_grouped_mm,
                 mla_decode: MLADecode = torch_mla_decode):
        """expert_ids: the routed experts this process holds (all by default, none for an attention-only side)."""
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config.rope_dim, config.rope, interleaved=config.is_mla)
        if expert_ids is None:
            expert_ids = range(config.n_routed_experts)
        self.dispatcher = dispatcher = dispatcher or LocalDispatcher(config.n_routed_experts)
        layers = []
        for i in range(config.num_hidden_layers):
            if config.is_mla:
                attn = MLAAttention(config, self.rotary, mla_decode)
            else:
                attn = LlamaAttention(config, self.rotary)
            if config.is_moe_layer(i):
                mlp = MoE(config, Experts(config, expert_ids, grouped_mm), dispatcher.for_layer(i))
            else:
                mlp = MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
            layers.append(DecoderLayer(config.hidden_size, config.rms_norm_eps, attn, mlp))
        self.model = Backbone(config, layers)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def weight_target(self, name: str) -> tuple[str, object]:
        return weight_target(self.config.architecture, name)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, D]."""
        return run_interleaved([self.stages(input_ids, positions, kv_cache, meta)])[0]

    def stages(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
               meta: AttentionMetadata) -> Generator[None, None, torch.Tensor]:
        """The forward pass as a generator that yields while each MoE layer's tokens are at the experts."""
        x = self.model.embed_tokens(input_ids)  # [T, D]
        cos, sin = self.rotary.cos_sin(positions)  # [T, R/2] each
        for layer, cache in zip(self.model.layers, kv_cache.layers):
            x = yield from layer.stages(x, cos, sin, cache, meta)
        return self.model.norm(x)

    def idle_stages(self, device: torch.device, dtype: torch.dtype) -> Generator[None, None, None]:
        """A micro-batch without tokens: it takes part in every MoE layer's all-to-all, with nothing to send."""
        empty = torch.empty(0, self.config.hidden_size, device=device, dtype=dtype)  # [0, D]
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                pending = layer.mlp.start(empty)
                yield
                layer.mlp.finish(pending)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [T, V]
