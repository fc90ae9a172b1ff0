"""The C grouped GEMM (float32; each of its builds, AVX2 and AVX-512, that this CPU runs) as the linear layers' kernel
(CpuLinear) and as a grouped GEMM whose groups span several row chunks: the same outputs as torch, the build chosen,
the fallbacks where it does not fit, and what pack_linears picks."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers import c_library
from workers.c_library import AVX2, CLibrary, cpu_flags
from workers.cpu_grouped_gemm import BUILDS, CpuGroupedGemm, library, pack_panels
from workers.cpu_linear import CpuLinear
from workers.packed_linear import PackedLinear, pack_linears

pytestmark = pytest.mark.skipif(CpuGroupedGemm.load() is None,
                                reason="no AVX2 and FMA, or no C compiler, here")
HERE = [isa for isa, build in BUILDS.items() if build.cpu_flags <= cpu_flags()]  # the builds this CPU runs


@pytest.fixture(params=HERE)
def isa(request, monkeypatch):
    monkeypatch.setenv("MOE_SERVE_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("outputs", [16, 80, 160])  # 1, 5 and 10 panels: AVX-512 takes them two at a time
@pytest.mark.parametrize("shape", [(0, 96), (1, 96), (7, 96), (2, 5, 96), (12, 96), (13, 96), (3, 50, 96),
                                   (700, 96)])
def test_same_result_as_linear(isa, shape, outputs, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, outputs, bias=bias)
    x = torch.randn(*shape)
    got = CpuLinear.build(linear)(x)
    assert got.shape == (*shape[:-1], outputs) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_build_chosen(monkeypatch):
    monkeypatch.delenv("MOE_SERVE_CPU_ISA", raising=False)
    assert library() is BUILDS["avx512" if "avx512f" in cpu_flags() else "avx2"]
    monkeypatch.setenv("MOE_SERVE_CPU_ISA", "avx2")  # no wider than AVX2
    assert library() is BUILDS["avx2"]
    monkeypatch.setattr("workers.c_library.cpu_flags", lambda: frozenset({"avx2"}))  # AVX2 without FMA
    monkeypatch.delenv("MOE_SERVE_CPU_ISA")
    assert library() is None and CpuGroupedGemm.load() is None
    monkeypatch.setenv("MOE_SERVE_CPU_ISA", "sse")
    with pytest.raises(ValueError, match="expected one of avx512, avx2"):
        library()


def test_a_changed_header_is_a_new_build(monkeypatch, tmp_path):
    """A kernel's cache key covers the headers in csrc/ as well as its source: a header edited rebuilds it."""
    csrc, cache = tmp_path / "csrc", tmp_path / "cache"
    csrc.mkdir()
    (csrc / "kernel.c").write_text('#include "shared.h"\nint twice(int x) { return TWICE(x); }\n')
    (csrc / "shared.h").write_text("#define TWICE(x) (2 * (x))\n")
    monkeypatch.setattr(c_library, "CSRC", csrc)
    monkeypatch.setenv("MOE_SERVE_KERNEL_CACHE", str(cache))
    lib = CLibrary(csrc / "kernel.c", AVX2, frozenset())
    first = lib.path()
    assert lib.path() == first  # unchanged: the build in the cache
    (csrc / "shared.h").write_text("#define TWICE(x) ((x) + (x))\n")
    assert lib.path() != first and len(list(cache.glob("kernel-*.so"))) == 2


def test_groups_over_several_row_chunks(isa):
    # at K = 96 a work item takes at most 336 rows (128 KiB of input): 700 rows are three chunks, 350 two
    torch.manual_seed(0)
    counts = [0, 700, 3, 0, 350, 1]
    w = torch.randn(len(counts), 32, 96)  # [G, N, K]
    x = torch.randn(sum(counts), 96)
    offsets = F.pad(torch.tensor(counts).cumsum(0), (1, 0))
    got = CpuGroupedGemm.load()(x, pack_panels(w), offsets)
    want = torch.cat([rows @ w[g].T for g, rows in enumerate(x.split(counts))])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        CpuGroupedGemm.load()(x, pack_panels(w), offsets.int())  # int32 offsets would be read as int64


def test_only_where_it_fits(monkeypatch, tmp_path, caplog):
    linear = nn.Linear(64, 96)
    assert isinstance(CpuLinear.build(linear), CpuLinear)
    assert CpuLinear.build(nn.Linear(64, 100)) is None  # outputs not a multiple of 16
    with pytest.warns(UserWarning):  # torch: initializing a zero-element weight is a no-op
        no_inputs = nn.Linear(0, 96)
    assert CpuLinear.build(no_inputs) is None
    assert CpuLinear.build(nn.Linear(64, 96).bfloat16()) is None
    with monkeypatch.context() as m:
        m.setenv("MOE_SERVE_CPU_LINEAR_KERNEL", "0")  # turned off
        assert CpuLinear.build(linear) is None
        model = nn.Sequential(nn.Linear(64, 96))
        assert pack_linears(model) == 1 and type(model[0]) is PackedLinear
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setenv("MOE_SERVE_KERNEL_CACHE", str(tmp_path))
        m.setenv("CC", "false")  # a compiler that fails
        assert CpuLinear.build(linear) is None
        assert "could not build the CPU grouped GEMM kernel" in caplog.text
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 100))
    assert pack_linears(model) == 2 and type(model[0]) is CpuLinear and type(model[1]) is PackedLinear
