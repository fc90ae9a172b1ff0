"""DecodeGraphs: the decode step's forward pass captured as CUDA graphs, one per padded batch size.

A decode step launches a few hundred small kernels; replaying them as one graph takes the CPU's launch time out of
the step. Each graph reads its inputs from static buffers (token ids, positions, cache slots, block tables, context
lengths) and writes its logits to a static output. A step of B decodes runs the graph of the smallest captured
size G >= B: the B real rows are copied in, and the G - B padding rows write their cache entry to the cache's pad
block and attend to that one entry, so they touch no sequence's cache. Their logits are dropped.

Only a forward pass that never reads back to the host can be captured: MLA decode through the paged kernel
(`paged_mla_decode`), the local dispatcher and torch._grouped_mm on its native path (bf16 on Hopper; elsewhere it
falls back to a loop that reads the group sizes back). A warm-up with CUDA's sync check on finds a read-back before
anything is captured. `build_runner` captures on CUDA only; `capture=False` runs the same padded static-buffer pass
eagerly (how it is tested on CPU). The experts' routing stats count the real rows only: a fifth input row marks
them, and the local dispatcher weighs each row's copies by it.
"""

from __future__ import annotations

import logging
import time

import torch

from workers.attention_metadata import AttentionMetadata
from workers.causal_lm import CausalLM
from workers.kv_cache import KVCache

log = logging.getLogger(__name__)
ROWS = ("token ids", "positions", "slots", "context lengths", "counted")  # counted: 1 a real row, 0 padding


def batch_sizes(max_batch: int) -> list[int]:
    """The captured sizes: 1, 2, 4, then every multiple of 8 up to max_batch (and max_batch itself)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_cache: KVCache, max_batch: int, max_blocks: int, device: torch.device,
                 capture: bool = True):
        """max_blocks: the widest block table (max_model_len in blocks)."""
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = batch_sizes(max_batch)
        self.capture = capture
        pinned = device.type == "cuda"
        # rows: token ids, positions, cache slots, context lengths, counted; each step's come in through one host copy
        self.inputs = torch.zeros(len(ROWS), max_batch, dtype=torch.long, device=device)  # [5, Bmax]
        self.input_ids, self.positions, self.slots, self.lens, self.counted = self.inputs
        self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.long, device=device)  # [Bmax, M]
        self.staged_inputs = torch.zeros(len(ROWS), max_batch, dtype=torch.long, pin_memory=pinned)
        self.staged_tables = torch.zeros(max_batch, max_blocks, dtype=torch.long, pin_memory=pinned)
        self.host_inputs, self.host_tables = self.staged_inputs.numpy(), self.staged_tables.numpy()  # their views
        self._pad(0, max_batch)
        self._copy_in(max_batch, max_blocks)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits = torch.empty(max_batch, model.config.vocab_size, device=device)  # [Bmax, V] every graph's
        if capture:
            self._capture_all(device)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _pad(self, start: int, stop: int) -> None:
        """Host rows start..stop become padding: token 0 at position 0, written to and read from the pad block, and
        left out of the routing stats."""
        pad = self.kv_cache.pad_block
        self.host_inputs[:, start:stop] = ((0,), (0,), (pad * self.kv_cache.block_size,), (1,), (0,))
        self.host_tables[start:stop, 0] = pad

    def _copy_in(self, G: int, width: int) -> None:
        self.inputs[:, :G].copy_(self.staged_inputs[:, :G], non_blocking=True)
        self.tables[:G, :width].copy_(self.staged_tables[:G, :width], non_blocking=True)

    def _forward(self, G: int) -> torch.Tensor:
        """The padded batch's logits [G, V], from the static buffers only (what a graph captures)."""
        meta = AttentionMetadata(
            slot_mapping=self.slots[:G], block_tables=self.tables[:G], context_lens=self.lens[:G],
            query_lens=(1,) * G,
            context_lens_list=(),  # on the host, so not in a graph: the paged decode path reads context_lens only
            block_size=self.kv_cache.block_size, num_decodes=G)
        stats = self.model.dispatcher.stats
        stats.counted_rows = self.counted  # read by the captured kernels at each replay
        try:
            hidden = self.model(self.input_ids[:G], self.positions[:G], self.kv_cache, meta)  # [G, D]
        finally:
            stats.counted_rows = None  # the eager passes (prefills, batches over max_batch) count every row
        return self.model.compute_logits(hidden)  # [G, V]

    @torch.inference_mode()
    def _capture_all(self, device: torch.device) -> None:
        """Raises RuntimeError where the forward pass reads back to the host (found in a warm-up, before capturing)."""
        t0 = time.perf_counter()
        torch.cuda.set_sync_debug_mode("error")
        try:
            self._forward(self.max_batch)  # warm-up (compiles the kernels); a read-back raises here
        finally:
            torch.cuda.set_sync_debug_mode("default")
        pool = None
        try:
            for G in reversed(self.sizes):  # largest first, so the smaller graphs fit in its memory pool
                self._forward(G)  # warm-up at this size, outside the capture
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[:G].copy_(self._forward(G))
                pool = graph.pool()
                self.graphs[G] = graph
        except BaseException:
            torch.cuda.set_stream(torch.cuda.default_stream(device))  # a failed capture can leave its stream current
            raise
        torch.cuda.synchronize(device)
        self.model.dispatcher.stats.zero()  # the warm-ups' expert counts
        log.info("captured %d decode graphs (batch 1 to %d) in %.1f s", len(self.graphs), self.max_batch,
                 time.perf_counter() - t0)

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            lens: list[int]) -> torch.Tensor:
        """One decode step of B <= max_batch sequences (a token each) -> logits [B, V]."""
        B = len(token_ids)
        G = next(s for s in self.sizes if s >= B)
        width = max(len(t) for t in tables)
        for row, values in zip(self.host_inputs, (token_ids, positions, slots, lens, (1,) * B)):
            row[:B] = values
        for i, t in enumerate(tables):  # a row at a time into the host array: ~10x faster than torch.tensor(lists)
            self.host_tables[i, : len(t)] = t
        self._pad(B, G)
        self._copy_in(G, width)  # the host arrays are rewritten next step, after this step's sampling synced
        if not self.capture:
            return self._forward(G)[:B]
        self.graphs[G].replay()
        return self.logits[:B]  # until the next replay
