"""The engine on real tiny models: batching, chunking, preemption, prefix reuse and forks change no token."""

import pytest
import torch

from tests.harness import GREEDY, engine, generate_tokens, hf_greedy, hf_logits, hf_model, random_prompts
from workers.config import ModelConfig
from workers.kv_cache import bytes_per_token
from workers.sampling_params import SamplingParams


@pytest.mark.parametrize("kind", ["v2_236b", "llama_mqa"])
def test_staggered_batch_of_32_equals_alone_and_transformers(checkpoint_dir, kind):
    d = checkpoint_dir(kind)
    lengths = [1 + (i * 37) % 150 for i in range(32)]
    prompts = random_prompts(lengths, seed=21)
    eng = engine(d, max_num_batched_tokens=256)
    ids, outs = {}, {}
    for i, p in enumerate(prompts):  # a new request every step, joining a batch that is mid-prefill and decoding
        ids[eng.add_request(p, GREEDY)] = i
        for out in eng.step():
            outs[out.request_id] = outs[out.request_id].merge(out) if out.request_id in outs else out
    while eng.has_unfinished():
        for out in eng.step():
            outs[out.request_id] = outs[out.request_id].merge(out) if out.request_id in outs else out
    batched = [None] * 32
    for rid, out in outs.items():
        batched[ids[rid]] = out.outputs[0].token_ids
    alone_engine = engine(d)
    ref = hf_model(d)
    for i, p in enumerate(prompts):
        assert batched[i] == generate_tokens(alone_engine, [p])[0], f"prompt {i} ({len(p)} tokens), batched vs alone"
        assert batched[i] == hf_greedy(ref, p), f"prompt {i} ({len(p)} tokens) vs transformers"


def test_batched_equals_alone_with_chunking_and_preemption(checkpoint_dir):
    d = checkpoint_dir("v2_236b")
    prompts = random_prompts([3, 50, 21, 90, 7, 64], seed=9)
    alone = [generate_tokens(engine(d), [p])[0] for p in prompts]
    # 24 blocks of 16 tokens cannot hold all six sequences at full length: decode must preempt
    block_bytes = bytes_per_token(ModelConfig.from_pretrained(d), torch.float32) * 16
    tight = engine(d, kv_cache_gib=24 * block_bytes / 2**30, max_num_batched_tokens=40)
    assert tight.executor.runner.kv_cache.num_blocks == 24
    batched = generate_tokens(tight, prompts)
    assert tight.scheduler.num_preemptions > 0
    assert batched == alone
    assert tight.scheduler.blocks.usage == 0.0  # every block returned


def test_shared_prefix_is_reused_and_changes_nothing(checkpoint_dir):
    d = checkpoint_dir("v2_lite")
    (system,) = random_prompts([100], seed=30)
    turns = [system + t for t in random_prompts([5, 20, 9], seed=31)]
    cold = engine(d, enable_prefix_caching=False)
    want = generate_tokens(cold, turns)
    warm = engine(d)
    first = warm.generate([turns[0]], [GREEDY])[0]
    rest = warm.generate(turns[1:], [GREEDY, GREEDY])
    assert first.num_cached_tokens == 0 and [o.num_cached_tokens for o in rest] == [96, 96]
    assert [o.outputs[0].token_ids for o in [first, *rest]] == want
    assert warm.stats().prefix_hit_rate > 0.5


def test_n_samples_are_seeded_and_share_the_prompt(checkpoint_dir):
    d = checkpoint_dir("v2_lite")
    (prompt,) = random_prompts([40], seed=32)
    params = SamplingParams(n=4, max_tokens=12, temperature=1.0, top_p=0.95, seed=3, ignore_eos=True)
    eng = engine(d)
    (out,) = eng.generate([prompt], [params])
    samples = [o.token_ids for o in out.outputs]
    assert len(samples) == 4 and len({tuple(s) for s in samples}) > 1
    (again,) = engine(d).generate([prompt], [params])
    assert [o.token_ids for o in again.outputs] == samples
    one = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=3, ignore_eos=True)
    assert generate_tokens(engine(d), [prompt], one)[0] == samples[0]
    assert eng.scheduler.blocks.usage == 0.0


def test_logprobs_are_the_models(checkpoint_dir):
    d = checkpoint_dir("llama_mha")
    (prompt,) = random_prompts([12], seed=33)
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True)
    (out,) = engine(d).generate([prompt], [params])
    sample = out.outputs[0]
    want = hf_logits(hf_model(d), prompt + sample.token_ids[:-1]).log_softmax(dim=-1)[len(prompt) - 1 :]  # [4, V]
    for i, lp in enumerate(sample.logprobs):
        assert lp.token_id == sample.token_ids[i] and lp.rank == 1  # greedy: the most likely
        assert lp.logprob == pytest.approx(want[i, lp.token_id].item(), abs=1e-4)
        top_ids = want[i].topk(3).indices.tolist()
        assert [t for t, _ in lp.top] == top_ids
        assert [v for _, v in lp.top] == pytest.approx(want[i, top_ids].tolist(), abs=1e-4)


def test_repetition_penalty_matches_transformers(checkpoint_dir):
    from transformers import GenerationConfig

    d = checkpoint_dir("llama_mha")
    (prompt,) = random_prompts([10], seed=34)
    params = SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.8, ignore_eos=True)
    ours = generate_tokens(engine(d), [prompt], params)[0]
    ref = hf_model(d)
    ids = torch.tensor([prompt])
    cfg = GenerationConfig(max_new_tokens=24, do_sample=False, repetition_penalty=1.8, eos_token_id=None,
                           pad_token_id=0)
    want = ref.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)[0, len(prompt):].tolist()
    assert ours == want
    assert ours != generate_tokens(engine(d), [prompt])[0][:24]  # the penalty did change something


@pytest.mark.slow
def test_32k_prompt_completes(checkpoint_dir):
    """Past the tiny model's 8192 positions on purpose: what is tested is the engine's memory, not the model."""
    d = checkpoint_dir("v2_lite")
    eng = engine(d, max_model_len=32768 + 16, kv_cache_gib=0.02, max_num_seqs=1)
    (prompt,) = random_prompts([32768], seed=41)
    (out,) = eng.generate([prompt], [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)])
    assert len(out.outputs[0].token_ids) == 16 and eng.scheduler.blocks.usage == 0.0
