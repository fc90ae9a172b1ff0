"""DecodeGraphs' padded static-buffer decode step, run eagerly on CPU (capture=False; the CUDA capture itself runs
in benchmarks/gpu_check.py): the same tokens, logits and cache as the plain decode path."""

import pytest
import torch

pytest.importorskip("triton")
from tests.harness import engine, random_prompts
from workers.decode_graphs import DecodeGraphs, batch_sizes
from workers.mla_decode import paged_mla_decode
from workers.sampling_params import SamplingParams


def test_batch_sizes():
    assert batch_sizes(1) == [1]
    assert batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(20) == [1, 2, 4, 8, 16, 20]


def paged_engine(model_dir, graphs_up_to: int | None = None):
    eng = engine(model_dir, enforce_eager=True)
    runner = eng.executor.runner
    for layer in runner.model.model.layers:
        layer.self_attn.mla_decode = paged_mla_decode
    if graphs_up_to:
        max_blocks = -(-eng.config.model_len(runner.model.config.max_position_embeddings) // eng.config.block_size)
        runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, graphs_up_to, max_blocks, runner.device,
                                     capture=False)
    return eng


def test_padded_graph_steps_match_eager(checkpoint_dir):
    """Five sequences ending at different steps: decode batches of 5 (more than the graphs hold: eager), 4 (exact),
    3 (padded to 4), 2 and 1. Tokens, every sequence's cache entries and the experts' routing counts match the eager
    engine's; the padding rows wrote to the pad block only."""
    d = checkpoint_dir("v2_236b", qk_rope_head_dim=16)  # the kernel's smallest dot
    eager, graphed = paged_engine(d), paged_engine(d, graphs_up_to=4)
    replays = []
    run = graphed.executor.runner.graphs.run
    graphed.executor.runner.graphs.run = lambda *a: replays.append(len(a[0])) or run(*a)
    prompts = random_prompts([3, 20, 7, 33, 1], seed=4)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 6, 9, 12, 15)]
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params)]
    assert got == want
    assert set(replays) == {4, 3, 2, 1} and 5 not in replays
    a, b = eager.executor.runner.kv_cache, graphed.executor.runner.kv_cache
    for x, y in zip(a.layers, b.layers):
        torch.testing.assert_close(y[: b.num_blocks], x[: a.num_blocks], rtol=1e-5, atol=1e-5)
    assert b.layers[0][b.pad_block].abs().sum() > 0  # the padding rows' entries went there
    # the routing stats count the real rows only, as the eager engine's do
    sent = [e.executor.runner.model.dispatcher.stats.as_dict()["sent"] for e in (eager, graphed)]
    assert sent[1] == sent[0] and sum(map(sum, sent[0].values())) > 0
    assert graphed.executor.runner.model.dispatcher.stats.counted_rows is None  # set only within a padded pass


def test_graph_logits_match_eager_logits(checkpoint_dir):
    """One decode step of three sequences through the padded graph path and through the plain path."""
    from tests.harness import decode_chunks

    d = checkpoint_dir("v2_236b", qk_rope_head_dim=16)  # the kernel's smallest dot
    eng = paged_engine(d, graphs_up_to=8)
    runner = eng.executor.runner
    prompts = random_prompts([9, 40, 2], seed=6)
    decode = decode_chunks(eng, prompts, first_token=7)
    graphed = runner.forward_logits(decode)  # [3, V]
    graphs, runner.graphs = runner.graphs, None
    plain = runner.forward_logits(decode)
    assert graphs.lens[:8].tolist() == [10, 41, 3, 1, 1, 1, 1, 1]  # padded to 8 after the three
    assert graphed.shape == plain.shape == (3, runner.model.config.vocab_size)
    torch.testing.assert_close(graphed, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_captured_graphs_match_eager_on_cuda(tmp_path):
    """Real capture (bf16, widths the kernel and torch._grouped_mm take): greedy tokens and routing counts as the
    eager engine's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from cluster.tiny_checkpoint import make_checkpoint

    d = make_checkpoint("v2_lite", tmp_path, qk_rope_head_dim=16, hidden_size=128, moe_intermediate_size=64)
    graphed = engine(d, device="cuda", dtype="bfloat16", max_num_seqs=8)
    eager = engine(d, device="cuda", dtype="bfloat16", max_num_seqs=8, enforce_eager=True)
    assert graphed.executor.runner.graphs is not None and eager.executor.runner.graphs is None
    prompts = random_prompts([3, 20, 7, 33, 1], seed=4)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 6, 9, 12, 15)]
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params)]
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    assert got == want
    # the replayed graphs counted the real rows only: as many copies per layer as the eager engine (which expert
    # each went to may differ on a bf16 near-tie)
    sent = [e.executor.runner.model.dispatcher.stats.as_dict()["sent"] for e in (eager, graphed)]
    assert {layer: sum(row) for layer, row in sent[1].items()} == {layer: sum(row) for layer, row in sent[0].items()}
