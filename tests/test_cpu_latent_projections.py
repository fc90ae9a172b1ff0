"""The absorbed MLA decode's W_UK and W_UV through the C grouped GEMM, a group per head (CpuLatentProjections): the
same results as the bmm form, chosen only where it fits, and swapped into the MLA layers of a float32 CPU engine."""

import pytest
import torch

from tests.harness import engine
from workers.cpu_grouped_gemm import LIBRARY
from workers.cpu_latent_projections import CpuLatentProjections, pack_latent_projections
from workers.latent_projections import LatentProjections
from workers.mla_attention import MLAAttention

pytestmark = pytest.mark.skipif(LIBRARY.load("the CPU grouped GEMM kernel", "skipped") is None,
                                reason="no AVX2 and FMA, or no C compiler, here")
H, N, V, L = 4, 48, 32, 64


def projections(dtype=torch.float32) -> LatentProjections:
    torch.manual_seed(0)
    w = torch.randn(H * (N + V), L, dtype=dtype)  # as kv_b_proj's rows: [W_UK of every head; W_UV of every head]
    return LatentProjections(lambda: (w[: H * N].view(H, N, L), w[H * N :].view(H, V, L)))


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_same_results_as_bmm(batch):
    bmm = projections()
    cpu = CpuLatentProjections.build(bmm)
    q_nope = torch.randn(batch, H, N + 16)[..., :N]  # a strided view, as split from the query
    o_latent = torch.randn(H, batch, L)
    got, want = cpu.query(q_nope), bmm.query(q_nope)
    assert got.shape == (H, batch, L)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got, want = cpu.output(o_latent), bmm.output(o_latent)
    assert got.shape == (batch, H, V)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_where_it_fits(monkeypatch):
    assert CpuLatentProjections.build(projections(torch.bfloat16)) is None
    monkeypatch.setenv("MOE_SERVE_CPU_LINEAR_KERNEL", "0")
    assert CpuLatentProjections.build(projections()) is None


def test_swapped_into_a_float32_engine(checkpoint_dir):
    model = engine(checkpoint_dir("v2_lite"), dtype="float32").executor.runner.model
    layers = [m for m in model.modules() if isinstance(m, MLAAttention)]
    assert layers and all(isinstance(m.latent_projections, CpuLatentProjections) for m in layers)
    assert pack_latent_projections(model) == 0  # nothing left to swap
