"""FakeRunner: a stand-in for the model runner that tests the scheduler and block manager on real bookkeeping.

It keeps a fake paged cache of (position, token) per slot, written through each chunk's block table. Every sampled
token is a function of the whole context *read back through the block table*, so a block that holds the wrong
tokens (a bad prefix hit, a bad fork, a stale block after preemption) changes the output.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from router.engine_config import EngineConfig
from router.llm_engine import LLMEngine
from workers.model_runner import SeqChunk
from workers.sampler import SampleResult

VOCAB = 1000


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int = 4):
        self.kv_cache = SimpleNamespace(num_blocks=num_blocks, block_size=block_size,
                                        num_slots=num_blocks * block_size)
        self.device = torch.device("cpu")
        self.slots: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)
        self.steps: list[list[SeqChunk]] = []

    def step(self, chunks: list[SeqChunk]) -> list[SampleResult]:
        self.steps.append(chunks)
        bs, out = self.kv_cache.block_size, []
        for c in chunks:
            for j, token in enumerate(c.token_ids):
                pos = c.start + j
                self.slots[c.block_table[pos // bs] * bs + pos % bs] = (pos, token)
            context = [self.slots[c.block_table[p // bs] * bs + p % bs] for p in range(c.start + len(c.token_ids))]
            assert [e[0] if e else None for e in context] == list(range(len(context))), "a slot holds another position"
            tokens = [e[1] for e in context]
            digest = sum((i + 1) * t for i, t in enumerate(tokens)) % VOCAB
            for row in c.samples:
                noise = 0 if row.generator is None else int(torch.randint(VOCAB, (1,), generator=row.generator))
                out.append(SampleResult((digest + noise) % VOCAB, None))
        return out


def fake_engine(num_blocks: int = 64, block_size: int = 4, **config) -> LLMEngine:
    model_config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=4096, eos_token_ids=())
    return LLMEngine(EngineConfig(block_size=block_size, **config), model_config, FakeRunner(num_blocks, block_size))
