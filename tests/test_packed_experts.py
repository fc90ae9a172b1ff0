"""Expert weights prepacked for oneDNN (CPU, float32 and bfloat16): the same outputs as the grouped GEMM they
replace, every expert group packed, and the same greedy tokens from the engine, in one process and on expert
workers."""

import pytest
import torch

from tests.harness import engine, generate_tokens, packing_dtypes, random_prompts
from workers.experts import Experts
from workers.packed_experts import PackedExperts, pack_experts

DTYPES = packing_dtypes()
TOLERANCE = {"float32": 1e-5, "bfloat16": 0}  # bf16: both are oneDNN's kernel; float32: MKL's unpacked


def plain_engine(d, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setattr("workers.model_runner.pack_experts", lambda model: 0)
        return engine(d, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_result_as_experts(checkpoint_dir, monkeypatch, dtype):
    model = plain_engine(checkpoint_dir("v2_lite"), monkeypatch, dtype=dtype).executor.runner.model
    experts = model.model.layers[1].mlp.experts
    assert type(experts) is Experts
    E, D = len(experts.expert_ids), experts.w13.shape[-1]
    tol = TOLERANCE[dtype]
    for big in (21, 16):  # 21 rows are padded to their bucket, 16 are not (no group is then)
        counts = torch.tensor([3, 0, 1, big] + [2] * (E - 4))  # an expert with no tokens, and one with one
        x = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
        got = PackedExperts(experts)(x, counts)
        assert got.shape == x.shape and got.dtype == x.dtype
        torch.testing.assert_close(got, experts(x, counts), rtol=tol, atol=tol)
    empty = x[:0]
    assert PackedExperts(experts)(empty, torch.zeros(E, dtype=torch.long)).shape == (0, D)


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_packs_every_expert_group_and_keeps_its_tokens(checkpoint_dir, monkeypatch, dtype):
    d = checkpoint_dir("v2_lite")
    prompts = random_prompts([5, 40, 17], seed=4)
    packed = engine(d, dtype=dtype)
    model = packed.executor.runner.model
    kinds = {type(layer.mlp.experts) for layer in model.model.layers if hasattr(layer.mlp, "experts")}
    assert kinds == {PackedExperts}
    assert pack_experts(model) == 0  # nothing left to pack
    assert generate_tokens(packed, prompts) == generate_tokens(plain_engine(d, monkeypatch, dtype=dtype), prompts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_workers_give_the_packed_single_process_tokens(checkpoint_dir, dtype):
    d = checkpoint_dir("v2_lite")
    prompts = random_prompts([9, 23], seed=5)
    single = generate_tokens(engine(d, dtype=dtype), prompts)
    split = engine(d, dtype=dtype, attention_workers=1, expert_workers=2)
    try:
        assert generate_tokens(split, prompts) == single
    finally:
        split.shutdown()
