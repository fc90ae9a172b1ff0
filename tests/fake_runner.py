"""FakeExecutor: a stand-in for the model that tests the scheduler and block manager on real bookkeeping.

Each attention rank keeps a fake paged cache of (position, token) per slot, written through each chunk's block
table. Every sampled token is a function of the whole context *read back through the block table*, so a block
that holds the wrong tokens (a bad prefix hit, a bad fork, a stale block after preemption, a sequence run on
another rank's cache) changes the output.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from router.engine_config import EngineConfig
from router.llm_engine import LLMEngine
from workers.executor import Executor
from workers.model_runner import SeqChunk, StepPlan
from workers.sampler import SampleResult, Sampler

VOCAB = 1000


class FakeExecutor(Executor):
    def __init__(self, num_blocks: int, block_size: int = 4, num_ranks: int = 1):
        self.num_blocks = (num_blocks,) * num_ranks
        self.block_size = block_size
        self.slots: list[list[tuple[int, int] | None]] = [[None] * (num_blocks * block_size) for _ in range(num_ranks)]
        self.samplers = [Sampler(torch.device("cpu")) for _ in range(num_ranks)]  # for the seeded generators
        self.rank_steps: list[list[list[SeqChunk]]] = []  # each step's chunks, per rank

    @property
    def steps(self) -> list[list[SeqChunk]]:
        """Each step's chunks on rank 0."""
        return [step[0] for step in self.rank_steps]

    def execute(self, plans: list[StepPlan]) -> list[list[SampleResult]]:
        self.rank_steps.append([plan.chunks for plan in plans])
        return [self._run(rank, plan) for rank, plan in enumerate(plans)]

    def profile(self) -> dict:
        steps = len(self.rank_steps)
        return {"steps": steps, "control_s": 0.0, "experts": [],
                "attention": [{"steps": steps, "busy_s": 0.0} for _ in self.num_blocks]}

    def _run(self, rank: int, plan: StepPlan) -> list[SampleResult]:
        sampler = self.samplers[rank]
        sampler.release(plan.release)
        slots, bs, out = self.slots[rank], self.block_size, []
        for c in plan.chunks:
            for j, token in enumerate(c.token_ids):
                pos = c.start + j
                slots[c.block_table[pos // bs] * bs + pos % bs] = (pos, token)
            context = [slots[c.block_table[p // bs] * bs + p % bs] for p in range(c.start + len(c.token_ids))]
            assert [e[0] if e else None for e in context] == list(range(len(context))), "a slot holds another position"
            tokens = [e[1] for e in context]
            digest = sum((i + 1) * t for i, t in enumerate(tokens)) % VOCAB
            for row in c.samples:
                gen = sampler.generator(row, VOCAB)  # drawn as the real sampler draws, so a resumed seed skips alike
                noise = 0 if gen is None else int(torch.multinomial(torch.ones(VOCAB), 1, generator=gen))
                out.append(SampleResult((digest + noise) % VOCAB, None))
        return out


def fake_engine(num_blocks: int = 64, block_size: int = 4, num_ranks: int = 1, **config) -> LLMEngine:
    model_config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=4096, eos_token_ids=())
    return LLMEngine(EngineConfig(block_size=block_size, **config), model_config,
                     FakeExecutor(num_blocks, block_size, num_ranks))
