"""Disaggregated expert parallelism: attention and expert workers as processes joined by all-to-all (gloo).

Every topology must give the single-process engine's tokens, which equal transformers'; every expert must run
only on its owner, on exactly the tokens routed to it.
"""

import multiprocessing as mp

import pytest
import torch

from tests.dispatch_check import world_size_one
from tests.harness import engine, hf_greedy, hf_model, random_prompts
from workers.causal_lm import run_interleaved
from workers.model_runner import SeqChunk, split_micro_batches
from workers.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
LENGTHS = [1, 5, 40, 17, 90, 3, 28]


def staggered(eng, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy tokens with a new request joining every other step; and each step's chunk count per attention rank."""
    steps = []
    execute = eng.executor.execute

    def recording(plans):
        steps.append([len(p.chunks) for p in plans])
        return execute(plans)

    eng.executor.execute = recording
    ids, outs, pending = {}, {}, list(enumerate(prompts))
    while pending or eng.has_unfinished():
        if pending and len(steps) % 2 == 0:
            i, p = pending.pop(0)
            ids[eng.add_request(p, PARAMS)] = i
        for out in eng.step():
            outs[out.request_id] = outs[out.request_id].merge(out) if out.request_id in outs else out
    tokens = [None] * len(prompts)
    for rid, out in outs.items():
        tokens[ids[rid]] = out.outputs[0].token_ids
    return tokens, steps


@pytest.mark.parametrize("kind", ["v2_lite", "v2_236b"])  # greedy routing; group-limited with routed scaling 16
def test_every_topology_gives_the_single_process_tokens(checkpoint_dir, kind):
    d = checkpoint_dir(kind)
    prompts = random_prompts(LENGTHS, seed=4)
    single, _ = staggered(engine(d, max_num_batched_tokens=64), prompts)
    ref = hf_model(d)
    assert single == [hf_greedy(ref, p, PARAMS.max_tokens) for p in prompts]
    for A, E, micro in [(1, 1, 2), (2, 2, 2), (2, 2, 1), (1, 3, 2), (3, 1, 2), (2, 0, 1)]:  # (2, 0): colocated DP
        eng = engine(d, max_num_batched_tokens=64, attention_workers=A, expert_workers=E, micro_batches=micro)
        try:
            got, steps = staggered(eng, prompts)
        finally:
            eng.shutdown()
        assert got == single, f"{A} attention + {E} expert workers, {micro} micro-batches"
        if A > 1:  # some steps ran with an attention rank that had no sequences
            assert any(0 in counts and any(counts) for counts in steps), steps


def test_experts_run_only_on_their_owner_on_the_routed_tokens(checkpoint_dir):
    d = checkpoint_dir("v2_236b")  # 16 routed experts, top-4, group-limited
    owner = [(e * 5) % 3 for e in range(16)]  # scattered, not contiguous
    prompts = random_prompts(LENGTHS, seed=8)
    local = engine(d, max_num_batched_tokens=64)
    routed = {}  # layer -> [E] tokens the colocated model's router sent to each expert
    for i, layer in enumerate(local.executor.runner.model.model.layers):
        if hasattr(layer.mlp, "gate"):
            def count(_, __, out, i=i):
                routed[i] = routed.get(i, 0) + torch.bincount(out[1].flatten(), minlength=16)
            layer.mlp.gate.register_forward_hook(count)
    want, _ = staggered(local, prompts)
    (colocated,) = local.executor.profile()["attention"]
    assert colocated["sent"] == {i: r.tolist() for i, r in routed.items()}  # the colocated path counts the same

    eng = engine(d, max_num_batched_tokens=64, attention_workers=1, expert_workers=3, expert_placement=tuple(owner))
    try:
        got, _ = staggered(eng, prompts)
        profile = eng.executor.profile()
    finally:
        eng.shutdown()
    assert got == want
    (attention,) = profile["attention"]
    assert attention["received"] == {}  # the attention worker runs no routed expert
    assert {layer: sent for layer, sent in attention["sent"].items()} == {i: r.tolist() for i, r in routed.items()}
    total = {layer: [0] * 16 for layer in routed}
    for w, worker in enumerate(profile["experts"]):
        mine = [e for e in range(16) if owner[e] == w]
        assert worker["experts"] == mine  # it holds exactly its experts' weights
        for layer, counts in worker["received"].items():
            assert all(c == 0 for e, c in enumerate(counts) if e not in mine)
            assert sum(counts) > 0
            total[layer] = [a + b for a, b in zip(total[layer], counts)]
    assert total == {i: r.tolist() for i, r in routed.items()}  # each expert saw exactly its routed tokens


def _world_size_one(model_dir, prompts, queue):
    queue.put(world_size_one(model_dir, "cpu", "float32", prompts))


def test_world_size_one_runs_the_all_to_all_path(checkpoint_dir):
    """The single-GPU NCCL check (benchmarks/gpu_check.py) runs this same function; here on gloo."""
    d = str(checkpoint_dir("v2_lite"))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_world_size_one, args=(d, random_prompts([7, 30, 2], seed=3), queue))
    proc.start()
    out = queue.get(timeout=120)
    proc.join(timeout=30)
    assert out["backend"] == out["expected_backend"] == "gloo"
    assert out["all_to_all"] == out["local"]
    assert out["copies_through_all_to_all"] > 0


def test_dense_models_and_bad_topologies_are_refused(checkpoint_dir):
    with pytest.raises(ValueError, match="dense model"):
        engine(checkpoint_dir("llama_mha"), expert_workers=1)
    with pytest.raises(ValueError, match="between 1 and 8"):
        engine(checkpoint_dir("v2_lite"), expert_workers=9)
    with pytest.raises(ValueError, match="worker 1 owns no expert"):
        engine(checkpoint_dir("v2_lite"), expert_workers=2, expert_placement=(0,) * 8)


def test_micro_batches_split_whole_chunks_evenly_and_in_order():
    chunks = [SeqChunk([1] * n, 0, [], ()) for n in (1, 1, 1, 1, 30, 28)]
    groups = split_micro_batches(chunks, 2)
    assert [len(c.token_ids) for g in groups for c in g] == [1, 1, 1, 1, 30, 28]  # contiguous, order kept
    assert [sum(len(c.token_ids) for c in g) for g in groups] == [34, 28]
    assert split_micro_batches(chunks[:1], 2) == [chunks[:1], []]  # one sequence: the other micro-batch idles


def test_micro_batches_take_turns_at_each_moe_layer():
    events = []

    def micro_batch(name, layers):
        for layer in range(layers):
            events.append((name, layer))
            yield
        return name

    assert run_interleaved([micro_batch("a", 3), micro_batch("b", 3)]) == ["a", "b"]
    assert events == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
