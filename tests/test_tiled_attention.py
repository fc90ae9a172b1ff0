"""tiled_attention equals plain causal attention, one tile or many, with grouped KV heads; fresh_runs groups the
prompts that may attend together."""

import pytest
import torch

import workers.tiled_attention as ta


def reference(q, k, v, context_len, scale):
    Q, H, _ = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)  # [C, H, Dk]
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    s = torch.einsum("qhd,chd->hqc", q, k) * scale
    rows = torch.arange(Q)[:, None] + context_len - Q
    s = s.masked_fill(torch.arange(context_len)[None, :] > rows, float("-inf"))
    return torch.einsum("hqc,chd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("budget", [1 << 30, 4096])  # one SDPA call; many tiles of 256
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("dk,dv", [(24, 16), (16, 24), (16, 16)])  # MLA's keys are wider than its values
@pytest.mark.parametrize("context", [1000, 300])  # a cached prefix before the queries; a fresh prompt
def test_tiled_equals_reference(monkeypatch, budget, kv_heads, dk, dv, context):
    monkeypatch.setattr(ta, "SCORE_BUDGET", budget)
    torch.manual_seed(0)
    C, Q, H = context, 300, 4
    q, k, v = torch.randn(Q, H, dk), torch.randn(C, kv_heads, dk), torch.randn(C, kv_heads, dv)
    got = ta.tiled_attention(q, lambda a, b: (k[a:b], v[a:b]), C, 0.2)
    assert got.shape == (Q, H, dv)
    torch.testing.assert_close(got, reference(q, k, v, C, 0.2), rtol=1e-5, atol=1e-5)


def test_fresh_runs():
    """Consecutive fresh prompts (query = context) of one length run together; anything else runs alone."""
    group = [(0, 0, 5, 5), (1, 5, 5, 5), (2, 10, 1, 8), (3, 11, 5, 5), (4, 16, 5, 5), (5, 21, 3, 3), (6, 24, 3, 7)]
    assert [[p[0] for p in run] for run in ta.fresh_runs(group, heads=16)] == [[0, 1], [2], [3, 4], [5], [6]]
    # prompts longer than a tile keep their tiles: 1000 tokens of 16 heads fit one (of 1048 keys), 1100 do not
    assert ta.tile_len(1000, 16) >= 1000 and ta.tile_len(1100, 16) < 1100
    assert [[p[0] for p in run] for run in ta.fresh_runs([(0, 0, 1000, 1000), (1, 1000, 1000, 1000)], 16)] == [[0, 1]]
    assert [[p[0] for p in run] for run in ta.fresh_runs([(0, 0, 1100, 1100), (1, 1100, 1100, 1100)], 16)] == [[0], [1]]
