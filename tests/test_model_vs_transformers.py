"""Our model against transformers, on tiny random checkpoints of every supported shape, in float32."""

import pytest
import torch

from tests.harness import (
    GREEDY,
    decode_chunks,
    engine,
    generate_tokens,
    hf_greedy,
    hf_logits,
    hf_model,
    prefill_logits,
    random_prompts,
)
from workers import llama_attention, mla_attention, tiled_attention
from workers.block_manager import BlockManager
from workers.model_runner import SeqChunk
from workers.sampler import SampleRow


def test_logits_match_transformers(checkpoint_dir, kind):
    d = checkpoint_dir(kind)
    eng, ref = engine(d), hf_model(d)
    prompts = random_prompts([7, 33, 1, 70])
    ours, _ = prefill_logits(eng, prompts)
    for p, got in zip(prompts, ours):
        want = hf_logits(ref, p)
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-4 * scale, f"{kind}: prompt of {len(p)} tokens"


@pytest.mark.parametrize("kind", ["v2_lite", "v2_236b"])
def test_mla_prefills_expanded_in_groups_match_transformers(checkpoint_dir, kind, monkeypatch):
    """Short prefills share one kv_b_proj up to the budget; the rest go alone (here 7+33 together, 1 and 70 each
    alone, 5+2 together)."""
    d = checkpoint_dir(kind)
    eng, ref = engine(d), hf_model(d)
    attn = eng.executor.runner.model.model.layers[0].self_attn
    per_token = attn.num_heads * (attn.nope_dim + attn.rope_dim + attn.v_dim)
    monkeypatch.setattr("workers.mla_attention.SCORE_BUDGET", 40 * per_token)
    assert [[p[3] for p in g] for g in attn._expansion_groups([(0, 0, n, n) for n in (7, 33, 1, 70, 5, 2)])] == \
        [[7, 33], [1], [70], [5, 2]]
    prompts = random_prompts([7, 33, 1, 70, 5, 2], seed=6)
    ours, _ = prefill_logits(eng, prompts)
    for p, got in zip(prompts, ours):
        want = hf_logits(ref, p)
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), f"prompt of {len(p)} tokens"


def test_fresh_prompts_of_one_length_attend_together(checkpoint_dir, kind, monkeypatch):
    """Each run of fresh prompts of one length attends in one SDPA call (in MLA, within a group of short prefills);
    a chunk over a cached prefix between them goes alone. Here: 6+6 together, then a 4-token chunk after 5 cached
    tokens, then 6+6+6 together, all in one forward; every position's logits are transformers'."""
    d = checkpoint_dir(kind)
    eng, ref = engine(d), hf_model(d)
    runner = eng.executor.runner
    calls = []
    together = tiled_attention.causal_attention

    def counted(q, k, v, n, scale):
        calls.append((n, q.shape[0] // n))  # (prompts, their length)
        return together(q, k, v, n, scale)

    for module in (mla_attention, llama_attention):
        monkeypatch.setattr(module, "causal_attention", counted)
    fresh = random_prompts([6] * 5, seed=7)
    (cont,) = random_prompts([9], seed=8)
    bm = BlockManager(runner.kv_cache.num_blocks, runner.kv_cache.block_size)

    def chunk(tokens: list[int], start: int, prompt: list[int]) -> SeqChunk:
        table: list[int] = []
        bm.grow(table, len(prompt))
        return SeqChunk(tokens, start, table, (SampleRow(GREEDY, 0, None, prompt, []),))

    first = chunk(cont[:5], 0, cont)
    runner.forward_logits([first], all_positions=True)  # its first 5 tokens cached
    chunks = [chunk(p, 0, p) for p in fresh]
    chunks.insert(2, first._replace(token_ids=cont[5:], start=5))
    logits = runner.forward_logits(chunks, all_positions=True).split([len(c.token_ids) for c in chunks])
    assert calls == [(2, 6), (3, 6)] * len(runner.model.model.layers)
    for c, got in zip(chunks, logits):
        want = hf_logits(ref, list(c.samples[0].prompt_ids))[c.start :]
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), f"chunk from {c.start}"


def test_greedy_32_tokens_identical(checkpoint_dir, kind):
    d = checkpoint_dir(kind)
    eng, ref = engine(d), hf_model(d)
    prompts = random_prompts([5, 17, 40], seed=1)
    outs = eng.generate(prompts, [GREEDY] * len(prompts))
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(ref, p), f"{kind}: prompt of {len(p)} tokens"
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kind", ["v2_lite", "v2_236b"])
def test_long_prompt_past_original_context(checkpoint_dir, kind):
    """YaRN's long-range part: a prompt 8x the checkpoint's original_max_position_embeddings (256)."""
    d = checkpoint_dir(kind)
    eng, ref = engine(d, max_num_batched_tokens=512), hf_model(d)
    (prompt,) = random_prompts([2048], seed=2)
    assert len(prompt) > 8 * ref.config.rope_parameters["original_max_position_embeddings"] - 1
    ours, _ = prefill_logits(eng, [prompt])
    want = hf_logits(ref, prompt)
    assert (ours[0] - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    (out,) = generate_tokens(eng, [prompt])  # chunked prefill: 4 chunks of 512
    assert out == hf_greedy(ref, prompt)


def test_llama_long_prompt_linear_scaling(checkpoint_dir):
    d = checkpoint_dir("llama_mqa")
    eng, ref = engine(d, max_num_batched_tokens=700), hf_model(d)
    (prompt,) = random_prompts([2000], seed=3)
    (out,) = generate_tokens(eng, [prompt])
    assert out == hf_greedy(ref, prompt)


@pytest.mark.parametrize("kind", ["v2_lite", "v2_236b"])
def test_8k_prompt(checkpoint_dir, kind):
    """Chunked prefill (4 chunks of 2048) over a growing cached prefix, then decode to the model's 8192 tokens."""
    d = checkpoint_dir(kind)
    eng, ref = engine(d, max_num_batched_tokens=2048, kv_cache_gib=0.2), hf_model(d)
    (prompt,) = random_prompts([8192 - 32], seed=4)
    (out,) = generate_tokens(eng, [prompt])
    assert out == hf_greedy(ref, prompt)


def test_absorbed_decode_equals_naive(checkpoint_dir):
    d = checkpoint_dir("v2_236b")
    eng = engine(d)
    prompts = random_prompts([9, 30, 3], seed=5)
    decode = decode_chunks(eng, prompts)  # one decode step for each sequence: its next token at the next position
    attn = [layer.self_attn for layer in eng.executor.runner.model.model.layers]
    absorbed = eng.executor.runner.forward_logits(decode)
    for a in attn:
        a.absorb_decode = False
    naive = eng.executor.runner.forward_logits(decode)
    assert absorbed.shape == (3, 512)
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5)
    # and both equal transformers on the prompt extended by that token
    ref = hf_model(d)
    for i, p in enumerate(prompts):
        want = hf_logits(ref, p + [11 + i])[-1]
        assert (absorbed[i] - want).abs().max().item() <= 1e-4 * want.abs().max().item()
