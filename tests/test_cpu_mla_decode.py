"""The CPU MLA decode kernels (C: bf16 with AVX512-BF16, float32 with AVX-512 or AVX2) against the gather-and-bmm
form, and their choice at build time. Each build's cases are skipped where this CPU or compiler cannot build it."""

import math
from dataclasses import replace

import pytest
import torch

from tests.harness import decode_chunks, engine, random_prompts
from workers import mla_decode
from workers.cpu_mla_decode import VARIANTS, CpuMLADecode, variant
from workers.mla_decode import decode_case, select_mla_decode, torch_mla_decode

CPU, BF16, F32 = torch.device("cpu"), torch.bfloat16, torch.float32
TOLERANCE = {BF16: 2e-2, F32: 1e-5}


def kernel(dtype: torch.dtype, isa: str) -> CpuMLADecode | None:
    """dtype's kernel built for `isa`; None where this CPU or compiler cannot build that one."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MOE_SERVE_CPU_ISA", isa)
        if variant(dtype) is not VARIANTS[dtype][isa]:
            return None
        return CpuMLADecode.build(64, 32, dtype)


BUILDS = {"bf16": (BF16, "avx512"), "float32 avx512": (F32, "avx512"), "float32 avx2": (F32, "avx2")}
KERNELS = {name: kernel(*build) for name, build in BUILDS.items()}


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.skipif(KERNELS[name] is None, reason="not on this CPU"))
                        for name in BUILDS], ids=list(BUILDS))
def build(request, monkeypatch):
    """A kernel build's name; MOE_SERVE_CPU_ISA keeps select_mla_decode to it."""
    monkeypatch.setenv("MOE_SERVE_CPU_ISA", BUILDS[request.param][1])
    return request.param


@pytest.fixture
def dtype(build):
    return BUILDS[build][0]


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# 20 heads: a partial head block; page 12: not a power of two; 6 heads: a part-filled group of 4 (float32)
@pytest.mark.parametrize("heads, page", [(16, 16), (20, 12), (6, 16)])
def test_kernel_matches_bmm_form(threads, build, dtype, heads, page):
    lens = (1, 37, 130, 300, 2)  # one entry; odd lengths; several tiles (of 128 in bf16, 64 in float32)
    q_latent, q_pe, cache, meta = decode_case(lens, heads, 64, 32, CPU, dtype, page=page, seed=3)
    got = KERNELS[build](q_latent, q_pe, cache, meta, 0.1)  # [H, B, L]
    want = torch_mla_decode(q_latent.float(), q_pe.float(), cache.float(), meta, 0.1)
    assert got.shape == (heads, len(lens), 64) and got.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_reads_nothing_past_a_sequence(threads, build, dtype):
    """Cache slots past each length (the rest of its last block, every other block, and block 0, which pads the
    block tables) hold NaN: none may reach the output, including the odd lengths' unpaired last entries."""
    lens = (5, 33, 16)
    q_latent, q_pe, cache, meta = decode_case(lens, 16, 64, 32, CPU, dtype, page=16, seed=4)
    want = KERNELS[build](q_latent, q_pe, cache, meta, 0.1)
    poisoned = torch.full((1 + cache.shape[0], *cache.shape[1:]), math.nan, dtype=dtype)  # block 0 added
    for i, n in enumerate(lens):
        for s in range(n):
            block, offset = meta.block_tables[i, s // 16], s % 16
            poisoned[1 + block, offset] = cache[block, offset]
    shifted = torch.zeros_like(meta.block_tables)  # table padding points at the NaN block
    for i, n in enumerate(lens):
        shifted[i, : -(-n // 16)] = meta.block_tables[i, : -(-n // 16)] + 1
    got = KERNELS[build](q_latent, q_pe, poisoned, replace(meta, block_tables=shifted), 0.1)
    assert torch.isfinite(got.float()).all()
    assert torch.equal(got, want)


def test_chosen_where_it_builds_agrees_and_wins(monkeypatch, dtype):
    assert select_mla_decode(CPU, torch.float16, 64, 32) is torch_mla_decode  # no kernel for it
    assert select_mla_decode(CPU, BF16, 64, 8) is torch_mla_decode  # bf16 entries of 72: not whole 32-wide chunks
    assert select_mla_decode(CPU, F32, 64, 4) is torch_mla_decode  # float32 entries of 68: not whole vectors
    assert select_mla_decode(CPU, dtype, 56, 40) is torch_mla_decode  # latents of 56: not whole value blocks
    assert select_mla_decode(CPU, dtype, 0, 0) is torch_mla_decode  # a dense model: no latents
    timings = {}
    monkeypatch.setattr(mla_decode, "_race", lambda forms, *a: [timings[fn is torch_mla_decode] for fn in forms])
    timings.update({False: 1.0, True: 2.0})  # the kernel faster on the probe
    chosen = select_mla_decode(CPU, dtype, 64, 32)
    assert isinstance(chosen, CpuMLADecode) and chosen.dtype == dtype
    timings.update({False: 1.0, True: 0.95})  # the bmm form a little faster: within the margin, the kernel stays
    assert isinstance(select_mla_decode(CPU, dtype, 64, 32), CpuMLADecode)
    monkeypatch.setenv("MOE_SERVE_CPU_MLA_KERNEL", "0")  # turned off
    assert select_mla_decode(CPU, dtype, 64, 32) is torch_mla_decode
    monkeypatch.delenv("MOE_SERVE_CPU_MLA_KERNEL")
    timings.update({False: 2.0, True: 1.0})  # the bmm form clearly faster
    assert select_mla_decode(CPU, dtype, 64, 32) is torch_mla_decode


def test_probe_outlasts_a_passing_stall(monkeypatch):
    """A slowdown as long as PROBE_ROUNDS runs, falling on the probe, leaves each form's best time as it was: the
    forms take turns, so it slows some runs of both rather than every run of one."""
    clock, calls = [0.0], []
    monkeypatch.setattr(mla_decode, "_clock", lambda: clock[0])

    def form(cost: float):
        def run(*args):
            calls.append(cost)
            stalled = 2 <= len(calls) < 2 + mla_decode.PROBE_ROUNDS  # as many runs as a form is timed for
            clock[0] += cost + (100.0 if stalled else 0.0)
        return run

    assert mla_decode._race((form(1.0), form(2.0)), None, None, None, 64) == [1.0, 2.0]
    assert len(calls) == 2 * (mla_decode.PROBE_ROUNDS + 1)


def test_a_failed_build_falls_back(monkeypatch, tmp_path, caplog, dtype):
    monkeypatch.setenv("MOE_SERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    assert CpuMLADecode.build(64, 32, dtype) is None
    assert select_mla_decode(CPU, dtype, 64, 32) is torch_mla_decode
    assert "could not build the CPU MLA decode kernel" in caplog.text
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_model_decode_through_kernel_matches_bmm_form(checkpoint_dir, monkeypatch, build, dtype):
    """The engine decodes through the kernel (where it wins the probe), with the same logits as through the
    bmms."""
    d = checkpoint_dir("v2_236b", kv_lora_rank=64, qk_rope_head_dim=32)
    monkeypatch.setattr(mla_decode, "_race", lambda forms, *a: [2.0 if fn is torch_mla_decode else 1.0 for fn in forms])
    eng = engine(d, dtype=str(dtype).removeprefix("torch."))
    layers = eng.executor.runner.model.model.layers
    assert all(isinstance(layer.self_attn.mla_decode, CpuMLADecode) for layer in layers)
    prompts = random_prompts([9, 70, 3, 150], seed=6)
    decode = decode_chunks(eng, prompts)
    logits = {}
    for name, fn in (("kernel", KERNELS[build]), ("bmm", torch_mla_decode)):
        for layer in layers:
            layer.self_attn.mla_decode = fn
        logits[name] = eng.executor.runner.forward_logits(decode).float()  # [4, V]
    scale = logits["bmm"].abs().max().item()
    assert (logits["kernel"] - logits["bmm"]).abs().max().item() <= (3e-2 if dtype == BF16 else 1e-5) * scale
    assert torch.equal(logits["kernel"].argmax(-1), logits["bmm"].argmax(-1))
