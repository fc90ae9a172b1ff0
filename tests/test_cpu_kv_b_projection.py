"""MLA's kv_b_proj with its absorbed-decode halves on the C grouped GEMM (float32, x86 with AVX2): the same queries'
latents and outputs as torch's bmms, for any batch, and the forms it does not take left to the bmms."""

import pytest
import torch

from workers.cpu_grouped_gemm import CpuGroupedGemm
from workers.cpu_kv_b_projection import CpuKvBProjection, pack_kv_b
from workers.kv_b_projection import KvBProjection

pytestmark = pytest.mark.skipif(CpuGroupedGemm.load() is None,
                                reason="the C grouped GEMM does not build or run here")


def projection(heads=3, nope=24, v=32, latent=48, dtype=torch.float32, seed=0) -> KvBProjection:
    proj = KvBProjection(heads, nope, v, latent).to(dtype)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return proj


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_absorb_and_expand_match_the_bmms(batch):
    bmm = projection()
    packed = CpuKvBProjection.build(bmm)
    assert packed is not None
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, 3, 24 + 16, generator=g)[..., :24]  # [B, H, N], a strided view as the model passes it
    o_latent = torch.randn(3, batch, 48, generator=g)  # [H, B, L]
    torch.testing.assert_close(packed.absorb(q), bmm.absorb(q), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed.expand(o_latent), bmm.expand(o_latent), rtol=1e-5, atol=1e-4)
    assert packed.absorb(q).shape == (3, batch, 48) and packed.expand(o_latent).shape == (batch, 3, 32)
    latent = torch.randn(7, 48, generator=g)
    assert torch.equal(packed(latent), bmm(latent))  # prefill's expansion: the same weight, the same call


def test_left_to_the_bmms_where_the_kernel_does_not_fit(monkeypatch):
    assert CpuKvBProjection.build(projection(latent=40)) is None  # W_UK's outputs: not whole panels of 16
    assert CpuKvBProjection.build(projection(v=20)) is None  # W_UV's outputs
    assert CpuKvBProjection.build(projection(dtype=torch.bfloat16)) is None
    model = torch.nn.ModuleList([projection(), projection(latent=40)])
    assert pack_kv_b(model) == 1
    assert type(model[0]) is CpuKvBProjection and type(model[1]) is KvBProjection
    assert pack_kv_b(model) == 0  # nothing left to pack
    monkeypatch.setenv("MOE_SERVE_CPU_LINEAR_KERNEL", "0")
    assert CpuKvBProjection.build(projection()) is None
