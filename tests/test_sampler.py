"""Sampler: what each knob keeps, penalties' arithmetic, and seeds that do not depend on the batch."""

import pytest
import torch

from workers.sampler import Sampler, SampleRow, chunked_first_max, first_max
from workers.sampling_params import SamplingParams

CPU = torch.device("cpu")
LOGITS = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])  # probabilities ~ .64 .23 .09 .03 .01 .004


def support(params: SamplingParams, draws: int = 400) -> set[int]:
    row = SampleRow(params, 0, 0, [], [])
    sampler = Sampler(torch.device("cpu"))
    return {sampler(LOGITS, [row])[0].token_id for _ in range(draws)}


@pytest.mark.parametrize("knobs, kept", [
    (dict(temperature=5.0), {0, 1, 2, 3, 4, 5}),  # flattened: every token comes up
    (dict(temperature=5.0, top_k=2), {0, 1}),
    (dict(temperature=1.0, top_p=0.8), {0, 1}),  # .64 < .8 <= .64 + .23
    (dict(temperature=1.0, min_p=0.1), {0, 1, 2}),  # at least .1 x .64
    (dict(temperature=1.0, top_k=3, top_p=0.7), {0, 1}),  # top-p over the renormalized top 3: .66, .24, .10
    (dict(temperature=0.0, top_k=3), {0}),
])
def test_truncation_keeps_what_it_should(knobs, kept):
    assert support(SamplingParams(**knobs)) == kept


def test_penalties_arithmetic():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    row = SampleRow(p, 0, None, prompt_ids=[1], output_ids=[0, 0, 3])
    got = Sampler._penalize(logits, [row])[0]
    # token 0: 2/2 - .25*2 - .5 = 0; token 1 (prompt only): -2*2 = -4; token 2 untouched; token 3: .5/2 - .25 - .5
    assert got.tolist() == pytest.approx([0.0, -4.0, 1.0, -0.5])
    assert Sampler(CPU)(logits, [row])[0].token_id == 2


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1)
    alone = Sampler(CPU)(logits[2:3], [SampleRow(p, 2, 9, [], [])])[0]
    rows = [SampleRow(SamplingParams(temperature=0.7), 0, None, [], []) for _ in range(5)]
    rows[2] = SampleRow(p, 2, 9, [], [])
    assert Sampler(CPU)(logits, rows)[2] == alone


def test_logprobs_rank_and_top():
    rows = [SampleRow(SamplingParams(temperature=0, logprobs=2), 0, None, [], []),
            SampleRow(SamplingParams(temperature=0), 1, None, [], [])]
    out = Sampler(CPU)(LOGITS.repeat(2, 1), rows)
    lp = LOGITS[0].log_softmax(-1)
    assert out[1].logprobs is None
    first = out[0].logprobs
    assert first.token_id == 0 and first.rank == 1 and first.logprob == pytest.approx(lp[0].item())
    assert [t for t, _ in first.top] == [0, 1] and first.top[1][1] == pytest.approx(lp[1].item())


@pytest.mark.parametrize("bad, message", [
    (dict(n=0), "n must be in"), (dict(n=129), "n must be in"), (dict(top_p=0), "top_p must be in"), (dict(min_p=1.5), "min_p must be in"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"), (dict(logprobs=21), "logprobs must be in"),
    (dict(presence_penalty=3), "presence_penalty must be in"), (dict(stop=("",)), "stop strings must not be empty"),
])
def test_bad_params_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


@pytest.mark.parametrize("vocab", [5, 256, 1000, 8192])
def test_chunked_first_max_is_argmax(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-3, 4, (6, vocab), generator=g).float()  # many ties: the first of them must win
    logits[1, vocab // 2] = logits[1, -1] = 9.0  # a tie across chunks
    logits[2] = float("-inf")  # nothing allowed: index 0, as argmax
    logits[3, vocab // 3] = float("nan")  # a NaN wins, as in argmax
    logits[4, -1] = 9.0  # the last logit, in the padded chunk
    want = logits.argmax(dim=-1)
    assert torch.equal(first_max(logits), want)
    assert torch.equal(chunked_first_max(logits), want)
    assert torch.equal(chunked_first_max(logits[:, : vocab - 1 or 1]), logits[:, : vocab - 1 or 1].argmax(dim=-1))
    assert chunked_first_max(logits[:0]).shape == (0,)  # no rows
