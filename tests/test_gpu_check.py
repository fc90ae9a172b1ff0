"""benchmarks/gpu_check.py's pieces that run anywhere: case parsing, and decode_rate's window and clean-up (on the
test device, its CUDA synchronisation stubbed where there is no CUDA)."""

import argparse

import pytest
import torch

from benchmarks import gpu_check
from tests.harness import engine


def test_parse_cases():
    assert gpu_check.parse_cases("1x1024,64x4096,") == [(1, 1024), (64, 4096)]
    assert gpu_check.parse_cases("") == []
    for bad in ("64", "1x2x3", "ax4", "0x16"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            gpu_check.parse_cases(bad)


def test_max_tokens_outlasts_the_window():
    """The first request admitted must still be decoding after the last one's prefill and the timed steps."""
    batch, context, steps, budget = 256, 4096, 64, 8192
    prefill_steps = -(-batch * context // budget)
    assert gpu_check.max_tokens(batch, context, steps, budget) > prefill_steps + steps


@pytest.fixture
def no_cuda_sync(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)


def test_decode_rate_times_whole_batch_steps_and_aborts(checkpoint_dir, no_cuda_sync):
    eng = engine(checkpoint_dir("v2_lite"), max_num_batched_tokens=64)  # prefill over several steps
    row = gpu_check.decode_rate(eng, batch=3, prompt_len=40, new_tokens=5, seed=1)
    assert row["decode_steps"] == 5 and row["decode_tok_s"] == pytest.approx(15 / row["decode_s"])
    assert not eng.has_unfinished()  # every request aborted after the window


def test_decode_rate_aborts_on_failure(checkpoint_dir, no_cuda_sync, monkeypatch):
    eng = engine(checkpoint_dir("v2_lite"))
    calls = []
    step = eng.step

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return step()

    monkeypatch.setattr(eng, "step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        gpu_check.decode_rate(eng, batch=2, prompt_len=8, new_tokens=4, seed=1)
    assert not eng.has_unfinished()  # nothing left running into the next case
