"""Scheduler and block manager on CPU, with fake model outputs."""

import re

import pytest

from router.request_output import RequestOutput
from tests.fake_runner import fake_engine
from workers.block_manager import BlockManager
from workers.sampling_params import SamplingParams

P = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def run(eng, prompts, params=P) -> list[RequestOutput]:
    return eng.generate(prompts, [params] * len(prompts))


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def prompts_of(lengths, seed=0):
    return [[(seed * 7 + i * 13 + j * 31) % 997 + 1 for j in range(n)] for i, n in enumerate(lengths)]


def test_token_budget_and_seq_limit_hold_and_steps_mix_prefill_with_decode():
    eng = fake_engine(max_num_batched_tokens=24, max_num_seqs=3)
    outs = run(eng, prompts_of([5, 40, 9, 17, 3]))
    steps = eng.executor.steps
    assert all(sum(len(c.token_ids) for c in s) <= 24 for s in steps)
    assert all(len(s) <= 3 for s in steps)
    assert any(any(len(c.token_ids) == 1 for c in s) and any(len(c.token_ids) > 1 for c in s) for s in steps)
    # decodes first in every step: the model's batched decode path takes the leading one-token chunks
    for s in steps:
        lens = [len(c.token_ids) for c in s]
        assert lens == sorted(lens, key=lambda n: n > 1)
    assert [len(t) for t in tokens(outs)] == [8] * 5


def test_long_prompt_is_chunked_and_does_not_stall_decodes():
    eng = fake_engine(max_num_batched_tokens=16)
    short, long = prompts_of([3, 100])
    eng.add_request(short, P)
    eng.step()  # the short prompt is prefilled and decoding
    eng.add_request(long, P)
    chunk_sizes = []
    while eng.scheduler.waiting or any(s.num_to_compute > 1 for s in eng.scheduler.running):
        eng.step()
        step = eng.executor.steps[-1]
        chunk_sizes += [len(c.token_ids) for c in step if len(c.token_ids) > 1]
        if eng.requests.get("0"):
            assert any(len(c.token_ids) == 1 for c in step), "the short request's decode waited for the prefill"
    assert sum(chunk_sizes) == 100 and max(chunk_sizes) <= 15 and len(chunk_sizes) >= 7


def test_preempted_requests_resume_with_the_same_tokens():
    prompts = prompts_of([10, 23, 7, 30, 15, 12])
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    roomy = fake_engine(num_blocks=200)
    want = tokens(run(roomy, prompts, params))
    assert roomy.scheduler.num_preemptions == 0
    tight = fake_engine(num_blocks=24, enable_prefix_caching=False)  # 96 slots for 6 sequences of up to 50
    assert tokens(run(tight, prompts, params)) == want
    assert tight.scheduler.num_preemptions > 0
    assert tight.scheduler.blocks.usage == 0.0
    cached = fake_engine(num_blocks=24)  # and with the prefix cache serving the recomputation
    assert tokens(run(cached, prompts, params)) == want
    assert cached.scheduler.num_preemptions > 0


def test_seeded_sampling_resumes_identically_after_preemption():
    prompts = prompts_of([10, 23, 7, 30, 15, 12], seed=3)
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=11, ignore_eos=True)
    want = tokens(run(fake_engine(num_blocks=200), prompts, params))
    tight = fake_engine(num_blocks=24)
    assert tokens(run(tight, prompts, params)) == want and tight.scheduler.num_preemptions > 0


def test_prefix_hits_are_counted_and_reused():
    eng = fake_engine(block_size=4)
    system = list(range(1, 19))  # 18 tokens: 4 full blocks
    a, b = system + [500, 501, 502], system + [600, 601]
    (out_a,) = run(eng, [a])
    assert out_a.num_cached_tokens == 0
    computed = len(eng.executor.steps)
    (out_b,) = run(eng, [b])
    assert out_b.num_cached_tokens == 16
    first_b = eng.executor.steps[computed][0]
    assert first_b.start == 16 and first_b.token_ids == b[16:]  # only the uncached tail ran
    blocks = eng.scheduler.blocks
    assert blocks.prefix_queries == len(a) + len(b) and blocks.prefix_hits == 16
    assert eng.stats().prefix_hit_rate == pytest.approx(16 / (len(a) + len(b)))
    # the same tokens as without a cache
    assert tokens([out_b]) == tokens(run(fake_engine(enable_prefix_caching=False), [b]))


def test_a_fully_cached_prompt_still_computes_its_last_token():
    eng = fake_engine(block_size=4)
    prompt = list(range(1, 17))  # exactly 4 blocks
    first = run(eng, [prompt])
    again = run(eng, [prompt])
    assert again[0].num_cached_tokens == 12
    assert tokens(again) == tokens(first)


def test_lru_eviction_keeps_the_most_recently_used_prefix():
    bm = BlockManager(num_blocks=4, block_size=2)

    class Seq:
        def __init__(self, ids):
            self.ids, self.block_table, self.block_hashes, self.num_cached = ids, [], [], 0

        num_tokens = property(lambda self: len(self.ids))

        def token_slice(self, a, b):
            return self.ids[a:b]

    def compute(seq):
        bm.grow(seq.block_table, seq.num_tokens)
        seq.num_cached = seq.num_tokens
        bm.commit(seq)
        bm.release(seq.block_table)

    old, new = Seq([1, 2, 3]), Seq([7, 8, 9])
    compute(old)
    compute(new)
    assert bm.num_free == 4 and len(bm.cached) == 2
    assert len(bm.match_prefix(Seq([1, 2, 0]))) == 1 and len(bm.match_prefix(Seq([7, 8, 0]))) == 1
    filler = Seq([])
    bm.grow(filler.block_table, 6)  # three blocks: the uncached ones first, then the oldest cached one
    assert bm.match_prefix(Seq([1, 2, 0])) == [] and len(bm.match_prefix(Seq([7, 8, 0]))) == 1
    hit = bm.match_prefix(Seq([7, 8, 0]))
    probe = Seq([7, 8, 0])
    bm.take_prefix(probe, hit)
    assert bm.blocks[hit[0]].ref_count == 1 and bm.num_free == 0
    bm.release(probe.block_table)
    bm.release(filler.block_table)
    assert bm.num_free == 4 and bm.usage == 0.0


def test_n_samples_share_the_prompt_blocks():
    eng = fake_engine(block_size=4)
    prompt = prompts_of([22])[0]
    params = SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=5, ignore_eos=True)
    (out,) = run(eng, [prompt], params)
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    prompt_tokens_run = sum(len(c.token_ids) for s in eng.executor.steps for c in s if c.start < len(prompt))
    # the prompt ran once; each fork recomputed only the partial last block's 2 tokens (+ its first output token)
    assert prompt_tokens_run == 22 + 2 * (2 + 1)
    # seeded: sample i is the same as a single seeded request with seed + i
    for i in range(3):
        single = SamplingParams(max_tokens=5, temperature=1.0, seed=5 + i, ignore_eos=True)
        assert tokens(run(fake_engine(block_size=4), [prompt], single))[0] == out.outputs[i].token_ids
    assert eng.scheduler.blocks.usage == 0.0


def test_abort_frees_blocks_and_spares_the_others():
    eng = fake_engine()
    a = eng.add_request(prompts_of([9])[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    b = eng.add_request(prompts_of([6], seed=2)[0], P)
    eng.step()
    eng.step()
    out = eng.abort(a)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert eng.abort(a) is None
    finished = []
    while eng.has_unfinished():
        finished += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in finished] == [b]
    assert eng.scheduler.blocks.usage == 0.0 and eng.stats().running == 0


def test_stop_token_ids_and_max_tokens():
    eng = fake_engine()
    (free,) = run(eng, prompts_of([5]), SamplingParams(max_tokens=6, temperature=0))
    assert free.outputs[0].finish_reason == "length" and len(free.outputs[0].token_ids) == 6
    stop_at = free.outputs[0].token_ids[2]
    (cut,) = run(fake_engine(), prompts_of([5]), SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(stop_at,)))
    assert cut.outputs[0].token_ids == free.outputs[0].token_ids[:3] and cut.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("prompt, params, message", [
    ([], P, "the prompt is empty"),
    ([1, 5000], P, "prompt token ids must be in [0, 1000)"),
    ([1] * 4096, P, "at most 4095 prompt tokens"),
    ([1, 2], SamplingParams(stop=("x",)), "stop strings need a tokenizer"),
])
def test_bad_requests_are_refused_with_what_to_fix(prompt, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fake_engine(num_blocks=2000).add_request(prompt, params)


def test_max_model_len_fits_the_cache():
    assert fake_engine(num_blocks=10).max_model_len == 40
    with pytest.raises(ValueError, match="does not fit in the KV cache"):
        fake_engine(num_blocks=10, max_model_len=100)


def test_data_parallel_ranks_share_the_work_and_keep_each_prefix_on_its_rank():
    prompts = prompts_of([5, 40, 9, 17, 3, 22, 30, 11])
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=2, ignore_eos=True)
    alone = fake_engine(max_num_batched_tokens=24)
    two = fake_engine(max_num_batched_tokens=24, num_ranks=2)
    for params in (P, seeded):  # each rank's cache read back gives the single-rank tokens, seeds included
        assert [[c.token_ids for c in o.outputs] for o in run(two, prompts, params)] == \
               [[c.token_ids for c in o.outputs] for o in run(alone, prompts, params)]
    per_rank = [sum(len(c.token_ids) for step in two.executor.rank_steps for c in step[r]) for r in (0, 1)]
    assert min(per_rank) > 0.3 * sum(per_rank)  # shared out by outstanding work
    assert two.stats().kv_usage == 0.0 and two.stats().num_blocks == 128

    shared = [7] * 32  # a common prefix, cached on rank 1 only
    two.add_request(prompts_of([60])[0], P)  # keeps rank 0 busy while the prefix is first computed
    two.generate([shared + [1]], [P])
    hits = [s.blocks.prefix_hits for s in two.schedulers]
    two.generate([shared + [2]], [P])  # both ranks idle now: the prefix decides
    assert [s.blocks.prefix_hits - h for s, h in zip(two.schedulers, hits)] == [0, 32]
