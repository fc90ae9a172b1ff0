"""Expert weights prepacked for the CPU: for oneDNN (PackedExperts, float32 and bfloat16) and, in float32 with
AVX2, for the C grouped GEMM (CpuExperts). The same outputs as the grouped GEMM they replace, every expert group
packed, and the same greedy tokens from the engine, in one process and on expert workers."""

import logging

import pytest
import torch

from tests.harness import engine, experts_of, generate_tokens, packing_dtypes, random_prompts
from workers.cpu_experts import CpuExperts
from workers.cpu_grouped_gemm import CpuGroupedGemm
from workers.experts import Experts
from workers.packed_experts import PackedExperts, pack_experts

DTYPES = packing_dtypes()
TOLERANCE = {"float32": 1e-5, "bfloat16": 0}  # bf16: both are oneDNN's kernel; float32: MKL's unpacked
C_KERNEL = CpuGroupedGemm.load() is not None
needs_c_kernel = pytest.mark.skipif(not C_KERNEL, reason="no AVX2 and FMA, or no C compiler, here")


def packed_kind(dtype: str) -> type:
    """What pack_experts gives in this dtype on this machine."""
    return CpuExperts if dtype == "float32" and C_KERNEL else PackedExperts


def plain_engine(d, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setattr("workers.model_runner.pack_experts", lambda model: 0)
        return engine(d, **kw)


KINDS = [pytest.param(PackedExperts, d.values[0], id=f"PackedExperts-{d.values[0]}", marks=d.marks) for d in DTYPES] + [
    pytest.param(CpuExperts.build, "float32", id="CpuExperts-float32", marks=needs_c_kernel)]


@pytest.mark.parametrize("pack, dtype", KINDS)
def test_same_result_as_experts(checkpoint_dir, monkeypatch, pack, dtype):
    model = plain_engine(checkpoint_dir("v2_lite"), monkeypatch, dtype=dtype).executor.runner.model
    experts = model.model.layers[1].mlp.experts
    assert type(experts) is Experts
    packed = pack(experts)
    E, D = len(experts.expert_ids), experts.w13.shape[-1]
    tol = TOLERANCE[dtype]
    # 21 rows are padded to their oneDNN bucket, 16 are not (no group is then); the C kernel takes 21 in blocks of
    # 5, 5, 5, 6 and 16 in 5, 5, 6, and the 1-7 rows of the others in one or two blocks
    for big in (21, 16):
        counts = torch.tensor([3, 0, 1, big, 7, 6, 5, 4] + [2] * (E - 8))  # an expert with no tokens, one with one
        x = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
        got = packed(x, counts)
        assert got.shape == x.shape and got.dtype == x.dtype
        torch.testing.assert_close(got, experts(x, counts), rtol=tol, atol=tol)
    empty = x[:0]
    assert packed(empty, torch.zeros(E, dtype=torch.long)).shape == (0, D)


@needs_c_kernel
def test_c_kernel_only_where_it_fits(checkpoint_dir, monkeypatch, tmp_path, caplog):
    model = plain_engine(checkpoint_dir("v2_lite"), monkeypatch, dtype="float32").executor.runner.model
    experts = model.model.layers[1].mlp.experts
    packed = CpuExperts.build(experts)
    assert isinstance(packed, CpuExperts)
    counts = torch.tensor([2] * len(experts.expert_ids))
    x = torch.randn(int(counts.sum()), experts.w13.shape[-1])
    for bad in (x[1:], x.double(), x[:, 1:]):  # rows that do not add up to the counts, a dtype, a width
        with pytest.raises(ValueError, match="expected"):
            packed(bad, counts)  # never read out of bounds
    with pytest.raises(ValueError, match="expected"):
        packed(x[:2], counts[:1])  # counts for fewer experts than it holds
    assert CpuExperts.build(experts_of(experts.w13, experts.w2[:, :-8])) is None  # D not a multiple of 16 outputs
    assert CpuExperts.build(experts_of(experts.w13.bfloat16(), experts.w2.bfloat16())) is None
    with monkeypatch.context() as m:
        m.setenv("MOE_SERVE_CPU_EXPERT_KERNEL", "0")  # turned off
        assert CpuExperts.build(experts) is None
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setenv("MOE_SERVE_KERNEL_CACHE", str(tmp_path))
        m.setenv("CC", "false")  # a compiler that fails
        assert CpuExperts.build(experts) is None
        assert "could not build the CPU grouped GEMM kernel" in caplog.text
        assert pack_experts(model) == 2 and type(model.model.layers[1].mlp.experts) is PackedExperts  # the fallback
    assert not list(tmp_path.iterdir())  # no half-written library left behind


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_packs_every_expert_group_and_keeps_its_tokens(checkpoint_dir, monkeypatch, dtype):
    d = checkpoint_dir("v2_lite")
    prompts = random_prompts([5, 40, 17], seed=4)
    packed = engine(d, dtype=dtype)
    model = packed.executor.runner.model
    kinds = {type(layer.mlp.experts) for layer in model.model.layers if hasattr(layer.mlp, "experts")}
    assert kinds == {packed_kind(dtype)}
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
