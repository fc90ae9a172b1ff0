"""ModelRunner: owns the model and its paged cache; turns a step's plan into forward passes and samples.

With a distributed dispatcher the step's chunks are split into micro-batches that run in turn, one MoE layer at a
time (ping-pong), so one micro-batch's attention overlaps another's experts. Every MoE all-to-all needs every
rank, so a runner with nothing to do this step still runs its (empty) micro-batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from router.engine_config import EngineConfig
from workers.attention_metadata import AttentionMetadata
from workers.causal_lm import CausalLM, run_interleaved
from workers.checkpoint import Checkpoint
from workers.config import ModelConfig, resolve_device, resolve_dtype
from workers.cpu_kv_b_projection import pack_kv_b
from workers.cpu_rms_norm import pack_norms
from workers.decode_graphs import DecodeGraphs
from workers.dispatcher import Dispatcher
from workers.grouped_mm import select_grouped_mm, torch_grouped_mm
from workers.kv_cache import KVCache, bytes_per_token
from workers.loader import build_model
from workers.local_dispatcher import LocalDispatcher
from workers.mla_decode import paged_mla_decode, select_mla_decode
from workers.packed_experts import pack_experts
from workers.packed_linear import pack_linears, packing_helps, warm_up
from workers.sampler import SampleResult, SampleRow, Sampler

log = logging.getLogger(__name__)


class SeqChunk(NamedTuple):
    token_ids: list[int]  # the new tokens to run
    start: int  # position of the first one (= tokens already cached)
    block_table: list[int]
    samples: tuple[SampleRow, ...]  # tokens to sample after the last one: none mid-prompt, n when forking


class StepPlan(NamedTuple):
    chunks: list[SeqChunk]  # decodes first, then prefill chunks
    release: tuple[int, ...] = ()  # finished sequences: drop their sampler state


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache, device: torch.device, micro_batches: int = 1,
                 collective: bool = False, graphs: DecodeGraphs | None = None):
        """collective: the model's MoE layers talk to other ranks, which need this one in every step.
        graphs: captured decode steps, replayed for the steps that only decode."""
        self.model = model
        self.graphs = graphs
        self.kv_cache = kv_cache
        self.device = device
        self.micro_batches = micro_batches
        self.collective = collective
        self.sampler = Sampler(device)
        self.dtype = next(model.parameters()).dtype
        self.steps = 0
        self.busy_s = 0.0  # time spent in execute()

    def prepare(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flattens the chunks. The leading one-token chunks take the batched decode path, so schedule them first."""
        bs = self.kv_cache.block_size
        ids, positions, slots = [], [], []
        for c in chunks:
            ids.extend(c.token_ids)
            pos = range(c.start, c.start + len(c.token_ids))
            positions.extend(pos)
            slots.extend(slot(c.block_table, p, bs) for p in pos)
        num_decodes = next((i for i, c in enumerate(chunks) if len(c.token_ids) > 1), len(chunks))
        tables = np.zeros((len(chunks), max(len(c.block_table) for c in chunks)), dtype=np.int64)  # [B, M]
        for i, c in enumerate(chunks):  # a row at a time: ~10x faster than torch.tensor of padded lists
            tables[i, : len(c.block_table)] = c.block_table
        context = [c.start + len(c.token_ids) for c in chunks]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.from_numpy(tables).to(dev),
            context_lens=torch.tensor(context, dtype=torch.long, device=dev),
            query_lens=tuple(len(c.token_ids) for c in chunks),
            context_lens_list=tuple(context),
            block_size=bs,
            num_decodes=num_decodes,
        )
        return (torch.tensor(ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev), meta)

    @torch.inference_mode()
    def forward_logits(self, chunks: list[SeqChunk], all_positions: bool = False) -> torch.Tensor:
        """Logits [S, V]: one row per sample of each chunk (every token's row with all_positions)."""
        if (self.graphs is not None and not all_positions and 0 < len(chunks) <= self.graphs.max_batch
                and all(len(c.token_ids) == 1 for c in chunks)):
            return self._graph_logits(chunks)
        groups = split_micro_batches(chunks, self.micro_batches)
        stages = []
        for group in groups:
            if group:
                input_ids, positions, meta = self.prepare(group)
                stages.append(self.model.stages(input_ids, positions, self.kv_cache, meta))
            else:
                stages.append(self.model.idle_stages(self.device, self.dtype))
        hidden = [h for h in run_interleaved(stages) if h is not None]  # [T_g, D] per non-empty group
        if not hidden:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        hidden = torch.cat(hidden) if len(hidden) > 1 else hidden[0]  # [T, D]
        if not all_positions:
            ends = torch.tensor([len(c.token_ids) for c in chunks], device=self.device).cumsum(0) - 1  # [B]
            repeats = torch.tensor([len(c.samples) for c in chunks], device=self.device)  # [B]
            hidden = hidden[ends.repeat_interleave(repeats)]  # [S, D]
        return self.model.compute_logits(hidden)

    def _graph_logits(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """A decode-only step through its captured graph: logits [S, V], one row per sample."""
        bs = self.kv_cache.block_size
        pos = [c.start for c in chunks]
        logits = self.graphs.run([c.token_ids[0] for c in chunks], pos,
                                 [slot(c.block_table, p, bs) for c, p in zip(chunks, pos)],
                                 [c.block_table for c in chunks], [p + 1 for p in pos])  # [B, V]
        repeats = [len(c.samples) for c in chunks]
        if any(r != 1 for r in repeats):  # a fork's n samples, or none mid-prompt
            rows = torch.arange(len(chunks), device=self.device).repeat_interleave(
                torch.tensor(repeats, device=self.device))
            logits = logits[rows]
        return logits

    def execute(self, plan: StepPlan) -> list[SampleResult]:
        """Runs the plan's chunks; returns their samples' tokens, in order."""
        t0 = time.perf_counter()
        self.sampler.release(plan.release)
        results: list[SampleResult] = []
        if plan.chunks or self.collective:
            logits = self.forward_logits(plan.chunks)
            rows = [row for c in plan.chunks for row in c.samples]
            results = self.sampler(logits, rows) if rows else []
        self.steps += 1
        self.busy_s += time.perf_counter() - t0
        return results

    def report(self) -> dict:
        """Steps run, seconds spent, and the tokens this rank routed to each expert (per MoE layer)."""
        return {"steps": self.steps, "busy_s": self.busy_s, **self.model.dispatcher.stats.as_dict()}


def slot(block_table: list[int], position: int, block_size: int) -> int:
    """The flat cache slot of a sequence's token at `position`."""
    return block_table[position // block_size] * block_size + position % block_size


def split_micro_batches(chunks: list[SeqChunk], n: int) -> list[list[SeqChunk]]:
    """n contiguous groups of whole chunks, as even in tokens as whole chunks allow (some may be empty). Contiguous
    keeps each group's decodes first, and the groups' outputs in the chunks' order."""
    if n == 1:
        return [chunks]
    total = sum(len(c.token_ids) for c in chunks)
    groups: list[list[SeqChunk]] = [[] for _ in range(n)]
    done, g = 0, 0
    for c in chunks:
        while g < n - 1 and groups[g] and done >= total * (g + 1) / n:
            g += 1
        groups[g].append(c)
        done += len(c.token_ids)
    return groups


def build_runner(config: EngineConfig, model_config: ModelConfig, dispatcher: Dispatcher | None = None,
                 expert_ids: Sequence[int] | None = None, micro_batches: int = 1) -> ModelRunner:
    """The model (all of it, or the attention side with `expert_ids=()`), loaded, with a KV cache from the budget."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    checkpoint = None if config.random_weights else Checkpoint(Path(config.model))
    model = build_model(CausalLM, model_config, device, dtype, checkpoint, seed=config.seed, expert_ids=expert_ids,
                        dispatcher=dispatcher, grouped_mm=select_grouped_mm(device, dtype),
                        mla_decode=select_mla_decode(device, dtype, model_config.kv_lora_rank,
                                                     model_config.qk_rope_head_dim))
    if packing_helps(device, dtype):
        log.info("%d linear layers', %d expert groups' and %d MLA kv_b projections' weights prepacked (for oneDNN or "
                 "the C grouped GEMM); %d RMSNorms on the C kernel", pack_linears(model), pack_experts(model),
                 pack_kv_b(model), pack_norms(model))
        t0 = time.perf_counter()
        kernels = warm_up(model, config.max_num_batched_tokens)  # a step's rows: at most its tokens
        log.info("%d oneDNN kernels built in %.1f s (each packed shape at each row bucket)", kernels,
                 time.perf_counter() - t0)
    max_len = config.model_len(model_config.max_position_embeddings)
    blocks_per_seq = -(-max_len // config.block_size)  # the widest block table
    if device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * config.gpu_memory_utilization)
    else:
        budget = int(config.kv_cache_gib * 2**30)
    kv_cache = KVCache.from_budget(model_config, budget, config.block_size, dtype, device,
                                   max_blocks=config.max_num_seqs * blocks_per_seq + 1)
    log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", kv_cache.num_blocks, config.block_size,
             kv_cache.num_blocks * bytes_per_token(model_config, dtype) * config.block_size / 2**30)
    collective = dispatcher is not None and not isinstance(dispatcher, LocalDispatcher)
    graphs = None
    if device.type == "cuda" and not config.enforce_eager and not collective:
        graphs = capture_decode(model, kv_cache, config.max_num_seqs, blocks_per_seq, device)
    return ModelRunner(model, kv_cache, device, micro_batches, collective, graphs)


def capture_decode(model: CausalLM, kv_cache: KVCache, max_batch: int, max_blocks: int,
                   device: torch.device) -> DecodeGraphs | None:
    """CUDA graphs of the decode step, where its forward pass never reads back to the host: MLA through the paged
    kernel and the experts through torch._grouped_mm (the fallbacks gather by host-side lengths)."""
    layers = model.model.layers
    mla = all(getattr(layer.self_attn, "mla_decode", None) is paged_mla_decode for layer in layers)
    experts = [layer.mlp.experts for layer in layers if hasattr(layer.mlp, "experts")]
    if not mla or any(e.grouped_mm is not torch_grouped_mm for e in experts):
        log.info("decode runs eagerly: its forward pass reads back to the host (no paged MLA kernel or grouped GEMM)")
        return None
    try:
        return DecodeGraphs(model, kv_cache, max_batch, max_blocks, device)
    except Exception as e:  # noqa: BLE001 -- a read-back (RuntimeError) or a kernel that fails to build: run eagerly
        log.warning("could not capture the decode step as CUDA graphs (%s); decode runs eagerly", str(e)[:500])
        return None
