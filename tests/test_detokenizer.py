"""IncrementalDetokenizer: whole characters only, stop strings across tokens, nothing of a stop string streamed."""

import pytest
from transformers import AutoTokenizer

from cluster.tiny_checkpoint import save_tokenizer
from router.detokenizer import IncrementalDetokenizer
from workers.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


def stream(tok, text: str, **params):
    """Feeds text's tokens one at a time; returns (the pieces streamed, the final text, whether a stop hit)."""
    detok = IncrementalDetokenizer(tok, tok.encode("x = "), SamplingParams(**params))
    pieces, stopped = [], False
    for t in tok.encode(text, add_special_tokens=False):
        stopped = detok.add(t)
        pieces.append(detok.delta(stopped))
        if stopped:
            break
    if not stopped:
        pieces.append(detok.delta(True))
    return pieces, detok.text, stopped


def test_multibyte_characters_are_never_split(tok):
    text = "naïve 世界 🙂!"
    pieces, final, _ = stream(tok, text)
    assert len(tok.encode(text, add_special_tokens=False)) > len(text)  # byte-level: characters span tokens
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == final == text


def test_stop_string_spanning_tokens_cuts_and_is_never_streamed(tok):
    pieces, final, stopped = stream(tok, "print('hi')\n# END of it", stop=("# END",))
    assert stopped and final == "print('hi')\n" and "".join(pieces) == final
    assert not any("#" in p for p in pieces)


def test_include_stop_str_and_earliest_stop_wins(tok):
    _, final, _ = stream(tok, "abcXYdefZZ", stop=("ZZ", "XY"), include_stop_str_in_output=True)
    assert final == "abcXY"


def test_special_tokens_are_skipped_unless_asked(tok):
    eos = tok.eos_token_id
    d = IncrementalDetokenizer(tok, [1], SamplingParams())
    for t in tok.encode("ab", add_special_tokens=False) + [eos]:
        d.add(t)
    assert d.text == "ab"
    d = IncrementalDetokenizer(tok, [1], SamplingParams(skip_special_tokens=False))
    for t in tok.encode("ab", add_special_tokens=False) + [eos]:
        d.add(t)
    assert d.text == "ab" + tok.eos_token
