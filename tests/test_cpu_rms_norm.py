"""RMSNorm's C kernel (float32, x86 with AVX2): transformers' result within float32 rounding, for any width (the
vector loops' tails included), strided rows read in place, a prefill's rows shared over threads; and the forms it
does not take left to torch."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from workers.cpu_rms_norm import LIBRARY, CpuRMSNorm, pack_norms
from workers.rms_norm import RMSNorm

pytestmark = pytest.mark.skipif(LIBRARY.load("the CPU RMSNorm kernel", "skipped") is None,
                                reason="the C RMSNorm kernel does not build or run here")


def norms(cols: int, eps: float = 1e-6, seed: int = 0) -> tuple[CpuRMSNorm, LlamaRMSNorm]:
    ours = RMSNorm(cols, eps)
    ref = LlamaRMSNorm(cols, eps)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(cols, generator=torch.Generator().manual_seed(seed)))
        ref.weight.copy_(ours.weight)
    kernel = CpuRMSNorm.build(ours)
    assert kernel is not None
    return kernel, ref


@pytest.mark.parametrize("shape", [(1, 512), (64, 512), (3, 37), (5, 8), (2, 7, 24), (600, 512)])  # 600 x 512: threaded
def test_matches_transformers(shape):
    kernel, ref = norms(shape[-1])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    got = kernel(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, ref(x), rtol=2e-6, atol=2e-6)


def test_strided_rows_read_in_place():
    kernel, ref = norms(32, eps=1e-5)
    wide = torch.randn(9, 40, generator=torch.Generator().manual_seed(2))  # [c_kv (32) | k_pe (8)]
    torch.testing.assert_close(kernel(wide[:, :32]), ref(wide[:, :32]), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(kernel(wide[:, :32]), kernel(wide[:, :32].contiguous()), rtol=0, atol=0)


def test_left_to_torch_where_the_kernel_does_not_fit(monkeypatch):
    model = torch.nn.ModuleList([RMSNorm(16), RMSNorm(16).to(torch.bfloat16)])
    assert pack_norms(model) == 1
    assert type(model[0]) is CpuRMSNorm and type(model[1]) is RMSNorm
    assert pack_norms(model) == 0
    with pytest.raises(ValueError, match="float32 rows expected"):
        model[0](torch.ones(2, 16, dtype=torch.bfloat16))
    monkeypatch.setenv("MOE_SERVE_CPU_NORM_KERNEL", "0")
    assert CpuRMSNorm.build(RMSNorm(16)) is None
