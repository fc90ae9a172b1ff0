"""Expert weights prepacked for oneDNN (CPU, bfloat16): the same outputs as the grouped GEMM they replace, every
expert group packed, and the same greedy tokens from the engine, in one process and on expert workers."""

import pytest
import torch

from tests.harness import engine, generate_tokens, random_prompts
from workers.experts import Experts
from workers.packed_experts import PackedExperts, pack_experts
from workers.packed_linear import packing_helps

pytestmark = pytest.mark.skipif(not packing_helps(torch.device("cpu"), torch.bfloat16),
                                reason="no oneDNN bf16 kernels here")


def plain_engine(d, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setattr("workers.model_runner.pack_experts", lambda model: 0)
        return engine(d, dtype="bfloat16", **kw)


def test_same_result_as_experts(checkpoint_dir, monkeypatch):
    model = plain_engine(checkpoint_dir("v2_lite"), monkeypatch).executor.runner.model
    experts = model.model.layers[1].mlp.experts
    assert type(experts) is Experts
    E, D = len(experts.expert_ids), experts.w13.shape[-1]
    counts = torch.tensor([3, 0, 1, 21] + [2] * (E - 4))  # an expert with no tokens, one with one, 21 (padded)
    x = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got = PackedExperts(experts)(x, counts)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, experts(x, counts), rtol=0, atol=0)
    empty = x[:0]
    assert PackedExperts(experts)(empty, torch.zeros(E, dtype=torch.long)).shape == (0, D)


def test_engine_packs_every_expert_group_and_keeps_its_tokens(checkpoint_dir, monkeypatch):
    d = checkpoint_dir("v2_lite")
    prompts = random_prompts([5, 40, 17], seed=4)
    packed = engine(d, dtype="bfloat16")
    model = packed.executor.runner.model
    kinds = {type(layer.mlp.experts) for layer in model.model.layers if hasattr(layer.mlp, "experts")}
    assert kinds == {PackedExperts}
    assert pack_experts(model) == 0  # nothing left to pack
    assert generate_tokens(packed, prompts) == generate_tokens(plain_engine(d, monkeypatch), prompts)


def test_expert_workers_give_the_packed_single_process_tokens(checkpoint_dir):
    d = checkpoint_dir("v2_lite")
    prompts = random_prompts([9, 23], seed=5)
    single = generate_tokens(engine(d, dtype="bfloat16"), prompts)
    split = engine(d, dtype="bfloat16", attention_workers=1, expert_workers=2)
    try:
        assert generate_tokens(split, prompts) == single
    finally:
        split.shutdown()
