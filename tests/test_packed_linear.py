"""Linear weights prepacked for oneDNN (CPU, float32 and bfloat16): the same outputs as the plain layers, the same
greedy tokens from the engine, and the layers whose weights are read directly or shared left alone."""

import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.harness import engine, experts_of, generate_tokens, packing_dtypes, random_prompts
from workers import packed_linear
from workers.cpu_grouped_gemm import CpuGroupedGemm
from workers.cpu_kv_b_projection import CpuKvBProjection
from workers.cpu_linear import CpuLinear
from workers.kv_b_projection import KvBProjection
from workers.packed_linear import (
    EXACT_ROWS,
    PackedLinear,
    bucket_rows,
    pack_linears,
    packing_helps,
    row_buckets,
    warm_up,
)

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN here")
DTYPES = packing_dtypes()
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
C_KERNEL = CpuGroupedGemm.load() is not None


def packed_kind(dtype: str) -> type:
    """What pack_linears gives a layer in this dtype on this machine."""
    return CpuLinear if dtype == "float32" and C_KERNEL else PackedLinear


def test_chosen_for_cpu_float32_and_bf16_where_the_cpu_has_it(monkeypatch):
    assert packing_helps(CPU, torch.float32) == (platform.machine() in ("x86_64", "AMD64"))
    assert packing_helps(CPU, torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert not packing_helps(CPU, torch.float16)
    assert not packing_helps(torch.device("cuda"), torch.bfloat16)
    assert not packing_helps(torch.device("cuda"), torch.float32)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # float32 packing measured on x86 only
    assert not packing_helps(CPU, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96), (21, 96), (3, 50, 96)])  # 21 and 150 rows: padded
def test_same_result_as_linear(shape, dtype):
    tol, dtype = TOLERANCE[dtype], getattr(torch, dtype)
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=True).to(dtype)
    x = torch.randn(*shape, 96).to(dtype)
    got = PackedLinear(linear)(x)
    assert got.shape == (*shape, 160) and got.dtype == dtype
    torch.testing.assert_close(got, F.linear(x, linear.weight, linear.bias), rtol=tol, atol=tol)


def test_row_buckets_few_and_tight():
    sizes = [bucket_rows(m) for m in range(1, 8193)]
    assert sizes[:EXACT_ROWS] == list(range(1, EXACT_ROWS + 1))  # small batches run as they are
    assert all(m <= b <= 1.25 * m for m, b in enumerate(sizes, start=1))
    assert sizes == sorted(sizes) and len(set(sizes)) == 52  # 16 exact, then 4 per power of two up to 8192


def test_warm_up_runs_each_distinct_shape_once_at_every_row_bucket(monkeypatch):
    from workers.packed_experts import PackedExperts

    def linear(k, n, bias=False):
        return PackedLinear(nn.Linear(k, n, bias=bias))

    experts = experts_of(torch.randn(2, 64, 64), torch.randn(2, 64, 32))  # two experts of hidden 64, intermediate 32
    model = nn.ModuleList([linear(64, 96), linear(64, 96), linear(64, 96, bias=True), linear(96, 64),
                           PackedExperts(experts)])
    runs = []
    real = packed_linear.packed_linear
    monkeypatch.setattr(packed_linear, "packed_linear",
                        lambda x, w, b=None: runs.append((x.shape[0], x.shape[1], w.shape[0], b is not None))
                        or real(x, w, b))
    assert warm_up(model, 100) == len(runs)
    shapes = {(64, 96, False), (64, 96, True), (96, 64, False), (64, 64, False), (32, 64, False)}  # (K, N, bias)
    assert sorted(runs) == sorted((rows, *shape) for rows in row_buckets(100) for shape in shapes)
    assert row_buckets(100) == [*range(1, 17), 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112]  # 100 pads to 112
    runs.clear()
    warm_up(model, 4096)
    assert max(rows for rows, *_ in runs) == packed_linear.WARM_ROWS  # above it a call's work dwarfs its kernel's


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_leaves_read_and_shared_weights(checkpoint_dir, dtype):
    eng = engine(checkpoint_dir("llama_mha", tie_word_embeddings=True), dtype=dtype)
    model = eng.executor.runner.model
    assert type(model.lm_head) is nn.Linear  # tied to the embedding: packing would keep a second copy
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.model.layers[0].self_attn.o_proj) is packed_kind(dtype)

    eng = engine(checkpoint_dir("v2_lite"), dtype=dtype)
    model = eng.executor.runner.model
    attn = model.model.layers[0].self_attn
    # not an nn.Linear: the absorbed decode reads its halves (packed per head where the C kernel takes them)
    assert type(attn.kv_b_proj) is (CpuKvBProjection if dtype == "float32" and C_KERNEL else KvBProjection)
    assert type(attn.o_proj) is packed_kind(dtype) and type(model.lm_head) is packed_kind(dtype)
    assert pack_linears(model) == 0  # nothing left to pack


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["v2_lite", "llama_mqa"])
def test_engine_tokens_unchanged(checkpoint_dir, kind, dtype, monkeypatch):
    d = checkpoint_dir(kind)
    prompts = random_prompts([5, 40, 17], seed=3)
    packed_engine = engine(d, dtype=dtype)
    assert type(packed_engine.executor.runner.model.lm_head) is packed_kind(dtype)
    packed = generate_tokens(packed_engine, prompts)
    monkeypatch.setattr("workers.model_runner.packing_helps", lambda *a: False)
    plain_engine = engine(d, dtype=dtype)
    assert not any(isinstance(m, (PackedLinear, CpuLinear)) for m in plain_engine.executor.runner.model.modules())
    assert packed == generate_tokens(plain_engine, prompts)
