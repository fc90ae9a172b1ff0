"""`moe-serve generate`: text and token-id inputs, JSONL out in input order, clear errors."""

import json
import subprocess
import sys

import pytest

from cluster.cli import main
from tests.harness import GREEDY, engine, hf_greedy, hf_model


def _write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_jsonl_text_and_token_ids(checkpoint_dir, tmp_path):
    d = checkpoint_dir("v2_lite")
    inp = _write(tmp_path / "in.jsonl", [
        {"prompt": "def fib(n):", "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        {"prompt_token_ids": [256, 10, 20, 30], "max_tokens": 5, "temperature": 0, "ignore_eos": True},
        {"prompt": "hello", "max_tokens": 6, "temperature": 0.8, "seed": 7, "top_p": 0.9, "top_k": 50},
    ])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(d), "--input", str(inp), "--output", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"index", "text", "token_ids", "finish_reason"}
    assert len(rows[0]["token_ids"]) == 8 and rows[0]["finish_reason"] == "length"
    ref = hf_model(d)
    tok_prompt = engine(d).tokenizer.encode("def fib(n):")
    assert tok_prompt[0] == 256  # BOS from the checkpoint's tokenizer
    assert rows[0]["token_ids"] == hf_greedy(ref, tok_prompt, 8)
    assert rows[1]["token_ids"] == hf_greedy(ref, [256, 10, 20, 30], 5)
    # the text is the tokens' text, less a trailing character whose bytes have not all come yet
    decoded = engine(d).tokenizer.decode(rows[0]["token_ids"], skip_special_tokens=True)
    assert rows[0]["text"] == decoded.removesuffix("\ufffd")
    # a seeded sampled request is reproducible
    out2 = tmp_path / "out2.jsonl"
    assert main(["generate", "--model", str(d), "--input", str(inp), "--output", str(out2), "--device", "cpu"]) == 0
    assert json.loads(out2.read_text().splitlines()[2]) == rows[2]


def test_prompt_flag_through_the_console_script(checkpoint_dir):
    d = checkpoint_dir("llama_mqa")
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--model", str(d), "--prompt", "print(", "--max-tokens",
         "4", "--temperature", "0", "--json", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["index"] == 0 and 1 <= len(row["token_ids"]) <= 4


def test_stop_string_cuts_the_text(checkpoint_dir, tmp_path):
    d = checkpoint_dir("v2_lite")
    eng = engine(d)
    (full,) = eng.generate([[256, 1, 2, 3]], [GREEDY])
    text = full.outputs[0].text
    stop = text[5:7]
    assert stop and stop in text
    inp = _write(tmp_path / "in.jsonl", [{"prompt_token_ids": [256, 1, 2, 3], "max_tokens": 32, "temperature": 0,
                                          "ignore_eos": True, "stop": stop}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(d), "--input", str(inp), "--output", str(out), "--device", "cpu"]) == 0
    row = json.loads(out.read_text())
    assert row["finish_reason"] == "stop" and row["text"] == text[: text.index(stop)]
    assert len(row["token_ids"]) < 32


@pytest.mark.parametrize("line, message", [
    ("{bad json", "in.jsonl:1: not valid JSON"),
    ('{"prompt": "x", "prompt_token_ids": [1]}', "exactly one of"),
    ('{"prompt": 5}', "'prompt' must be a string"),
    ('{"prompt": "x", "max_tokens": -1}', "max_tokens must be >= 1"),
    ('{"prompt": "x", "bogus": 1}', "unknown field"),
    ('{"prompt_token_ids": [1, 99999]}', "token ids must be in"),
    ('{"prompt_token_ids": []}', "prompt is empty"),
])
def test_bad_input_is_a_clear_error(checkpoint_dir, tmp_path, capsys, line, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text(line + "\n")
    code = main(["generate", "--model", str(checkpoint_dir("llama_mha")), "--input", str(inp), "--device", "cpu"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_offline_job_on_two_attention_and_two_expert_workers(checkpoint_dir, tmp_path):
    d = checkpoint_dir("v2_236b")
    inp = _write(tmp_path / "in.jsonl", [
        {"prompt": "def fib(n):", "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        {"prompt_token_ids": [256, 10, 20, 30], "max_tokens": 5, "temperature": 0, "ignore_eos": True},
        {"prompt": "hello", "max_tokens": 6, "temperature": 0.8, "seed": 7, "top_p": 0.9, "n": 2},
        {"prompt": "x" * 70, "max_tokens": 4, "temperature": 0, "logprobs": 2},
    ])
    outs = {}
    for name, flags in {"one process": [], "2+2": ["--attention-workers", "2", "--expert-workers", "2"]}.items():
        out = tmp_path / f"{len(outs)}.jsonl"
        assert main(["generate", "--model", str(d), "--input", str(inp), "--output", str(out), "--device", "cpu",
                     "--dtype", "float32", *flags]) == 0
        outs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(outs["2+2"]) == 5  # one line per sample
    # tokens, text, seeds and n exactly; logprobs to float32 rounding (the batches' shapes differ per topology)
    assert [without_logprobs(o) for o in outs["2+2"]] == [without_logprobs(o) for o in outs["one process"]]
    for got, want in zip(outs["2+2"], outs["one process"]):
        for g, w in zip(got.get("logprobs") or [], want.get("logprobs") or []):
            assert g["token_id"] == w["token_id"] and g["rank"] == w["rank"]
            assert [t for t, _ in g["top"]] == [t for t, _ in w["top"]]
            assert g["logprob"] == pytest.approx(w["logprob"], abs=1e-5)
            assert [lp for _, lp in g["top"]] == pytest.approx([lp for _, lp in w["top"]], abs=1e-5)
    assert sum(len(o.get("logprobs") or []) for o in outs["2+2"]) == 4


def without_logprobs(out: dict) -> dict:
    return {k: v for k, v in out.items() if k != "logprobs"}
