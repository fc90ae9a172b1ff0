"""The Triton MLA decode kernel against the gather-and-bmm form: on CUDA when there is one (benchmarks/gpu_check.py
runs this file there), else on CPU under Triton's interpreter (float32 and float16; it misreads bfloat16)."""

import pytest
import torch

pytest.importorskip("triton")
import workers.triton_mla_decode as kernel  # under the interpreter on CPU: see conftest
from tests.harness import decode_chunks, engine, hf_logits, hf_model, random_prompts
from workers import mla_decode
from workers.mla_decode import paged_mla_decode, select_mla_decode, torch_mla_decode

ON_GPU = torch.cuda.is_available()

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]


def decode_case(lens, heads, latent, rope, page, dtype, seed=0):
    """Random queries and a cache whose sequences own shuffled, scattered blocks."""
    return mla_decode.decode_case(tuple(lens), heads, latent, rope, DEVICE, dtype, page, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("programs", [None, 400])  # the device's own split count; many splits, most of them empty
def test_kernel_matches_bmm_form(dtype, programs, monkeypatch):
    if programs:
        monkeypatch.setattr(kernel, "_num_programs", lambda device: programs)
    lens = (1, 37, 130)  # one entry; a partial last page; several tiles
    # 20 heads: a partial head group
    q_latent, q_pe, cache, meta = decode_case(lens, heads=20, latent=64, rope=16, page=16, dtype=dtype)
    splits = kernel.num_splits(len(lens), 20, DEVICE)
    assert splits == (min(kernel.MAX_SPLITS, -(-programs // 6)) if programs else splits)
    got = paged_mla_decode(q_latent, q_pe, cache, meta, 0.1)
    want = torch_mla_decode(q_latent.float(), q_pe.float(), cache.float(), meta, 0.1)
    assert got.shape == (20, 3, 64) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("programs", [None, 400])
def test_kernel_at_real_widths(programs, monkeypatch):
    """DeepSeek-V2's widths (latent 512, rope 64, 16 heads), contexts up to 1000 entries in 16-token pages."""
    if programs:
        monkeypatch.setattr(kernel, "_num_programs", lambda device: programs)
    lens = (1, 300, 1000)
    q_latent, q_pe, cache, meta = decode_case(lens, heads=16, latent=512, rope=64, page=16, dtype=DTYPES[-1], seed=2)
    got = paged_mla_decode(q_latent, q_pe, cache, meta, 0.05)
    want = torch_mla_decode(q_latent.float(), q_pe.float(), cache.float(), meta, 0.05)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_split_count_depends_on_batch_only():
    """The launch grid must not follow the context (CUDA graphs replay one grid): many splits for one sequence,
    one split once the batch fills the device."""
    one, full = kernel.num_splits(1, 16, DEVICE), kernel.num_splits(4096, 16, DEVICE)
    assert full == 1 and one >= 1
    assert kernel.num_splits(1, 128, DEVICE) <= one  # more head groups, fewer splits


def test_selected_on_cuda_only():
    chosen = select_mla_decode(DEVICE, DTYPES[-1], 64, 16)
    assert chosen is (paged_mla_decode if ON_GPU else torch_mla_decode)
    assert select_mla_decode(DEVICE, DTYPES[-1], 48, 16) is torch_mla_decode  # tl.arange needs powers of two
    assert select_mla_decode(DEVICE, DTYPES[-1], 64, 8) is torch_mla_decode  # tl.dot needs K >= 16


def test_model_decode_through_kernel_matches_transformers(checkpoint_dir):
    """The tiny DeepSeek-V2's decode step through the kernel gives transformers' logits (rope width 16: tl.dot's
    smallest)."""
    d = checkpoint_dir("v2_236b", qk_rope_head_dim=16)
    eng = engine(d)
    for layer in eng.executor.runner.model.model.layers:
        layer.self_attn.mla_decode = paged_mla_decode
    prompts = random_prompts([9, 70, 3], seed=5)
    decode = decode_chunks(eng, prompts)
    got = eng.executor.runner.forward_logits(decode)  # [3, V]
    ref = hf_model(d)
    for i, p in enumerate(prompts):
        want = hf_logits(ref, p + [11 + i])[-1]
        assert (got[i] - want).abs().max().item() <= 1e-4 * want.abs().max().item(), f"prompt of {len(p)} tokens"
