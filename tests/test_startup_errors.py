"""Bad input at startup: a missing or corrupt checkpoint file, or a wrong config, is one clear line naming the file or
field and exit code 2, not a traceback, for `moe-serve generate` and for `moe-serve up` (which finds it before Ray
starts, so in seconds, instead of in a Serve replica that Serve retries)."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.cli import main

UP_TIMEOUT_S = 120  # `up` fails in seconds, before Ray starts; this is room for a loaded CI machine
SHARD_TENSOR = "model.layers.1.mlp.up_proj.weight"  # the tensor the shard cases remove or reshape


def read_json(path: Path):
    return json.loads(path.read_text())


def shard_of(d: Path, tensor: str) -> Path:
    return d / read_json(d / "model.safetensors.index.json")["weight_map"][tensor]


def edit_config(**fields):
    """A case that sets (or with None, removes) config.json fields."""
    def edit(d: Path) -> None:
        cfg = read_json(d / "config.json")
        for key, value in fields.items():
            if value is None:
                cfg.pop(key)
            else:
                cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def rewrite_shard(d: Path, change) -> None:
    """Rewrites the shard holding SHARD_TENSOR with change(tensors) applied."""
    path = shard_of(d, SHARD_TENSOR)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def drop_everywhere(d: Path) -> None:
    rewrite_shard(d, lambda t: t.pop(SHARD_TENSOR))
    index = read_json(d / "model.safetensors.index.json")
    del index["weight_map"][SHARD_TENSOR]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def only_pickle(d: Path) -> None:
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"never read")


def first_shard(d: Path) -> Path:
    return min(d.glob("model-*.safetensors"))


# name -> (how to break a good checkpoint, what the message must say); "{d}" is the checkpoint directory
CASES = {
    "model dir missing": (lambda d: shutil.rmtree(d), ["{d}: no such model directory"]),
    "config.json missing": (lambda d: (d / "config.json").unlink(), ["{d}/config.json: no config.json"]),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{oops"), ["{d}/config.json: not valid JSON"]),
    "config.json not an object": (lambda d: (d / "config.json").write_text("[1, 2]"),
                                  ["{d}/config.json: expected a JSON object"]),
    "field missing": (edit_config(hidden_size=None), ["{d}/config.json: field 'hidden_size' is required"]),
    "field of the wrong type": (edit_config(hidden_size="abc"),
                                ["{d}/config.json: field 'hidden_size' must be an integer", "'abc'"]),
    "float where an int goes": (edit_config(num_hidden_layers=2.5), ["field 'num_hidden_layers'", "2.5"]),
    "rope_scaling not an object": (edit_config(rope_scaling="linear"), ["field 'rope_scaling' must be an object"]),
    "rope factor not a number": (edit_config(rope_scaling={"type": "linear", "factor": "big"}),
                                 ["field 'rope_scaling.factor' must be a number"]),
    "unknown model_type": (edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                           ["{d}/config.json: field 'architectures'", "GPT2LMHeadModel", "is not supported"]),
    "shard truncated": (lambda d: first_shard(d).write_bytes(first_shard(d).read_bytes()[:-10]),
                        ["{d}/model-00001-of-", "truncated"]),
    "shard of garbage bytes": (lambda d: first_shard(d).write_bytes(bytes(range(256)) * 64),
                               ["{d}/model-00001-of-", "corrupt safetensors header"]),
    "shard empty": (lambda d: first_shard(d).write_bytes(b""), ["{d}/model-00001-of-", "not a safetensors file"]),
    "shard in the index missing": (lambda d: first_shard(d).unlink(),
                                   ["{d}/model-00001-of-", "listed in model.safetensors.index.json but missing"]),
    "index not JSON": (lambda d: (d / "model.safetensors.index.json").write_text("{oops"),
                       ["{d}/model.safetensors.index.json: not a valid safetensors index"]),
    "tensor the index lists missing from its shard": (
        lambda d: rewrite_shard(d, lambda t: t.pop(SHARD_TENSOR)),
        ["{d}/model-", f"has no tensor '{SHARD_TENSOR}'", "model.safetensors.index.json"]),
    "tensor missing from all shards": (drop_everywhere, ["{d}: checkpoint lacks weights for",
                                                          "model.layers.1.mlp.gate_up_proj.weight up"]),
    "tensor of the wrong shape": (lambda d: rewrite_shard(d, lambda t: t.update({SHARD_TENSOR: torch.zeros(3, 5)})),
                                  ["{d}/model-", f"tensor '{SHARD_TENSOR}'", "(3, 5)"]),
    "only pytorch_model.bin": (only_pickle, ["{d}: no model.safetensors", "only safetensors", "pytorch_model.bin"]),
    "tokenizer.json corrupt": (lambda d: (d / "tokenizer.json").write_text("{oops"),
                               ["{d}: cannot load the tokenizer from tokenizer.json"]),
}
UP_CASES = ["field of the wrong type", "shard truncated", "tensor of the wrong shape", "tokenizer.json corrupt"]


@pytest.fixture(scope="module")
def broken(checkpoint_dir, tmp_path_factory):
    """broken(case) -> a copy of the tiny Llama checkpoint broken as the case says (made once)."""
    root, made = tmp_path_factory.mktemp("broken"), {}

    def get(case: str) -> Path:
        if case not in made:
            d = root / case.replace(" ", "_")
            shutil.copytree(checkpoint_dir("llama_mha"), d)
            CASES[case][0](d)
            made[case] = d
        return made[case]

    return get


def expected(case: str, d: Path) -> list[str]:
    return [s.format(d=d) for s in CASES[case][1]]


def assert_one_clean_error(err: str, says: list[str]) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moe-serve: error: "), err
    for s in says:
        assert s in lines[0], (s, err)


@pytest.mark.parametrize("case", list(CASES))
def test_generate_names_the_file_or_field(broken, case, capsys):
    d = broken(case)
    capsys.readouterr()  # making the checkpoint printed progress
    code = main(["generate", "--model", str(d), "--prompt", "hi", "--max-tokens", "2", "--device", "cpu"])
    assert code == 2
    assert_one_clean_error(capsys.readouterr().err, expected(case, d))


def test_a_good_checkpoint_passes_the_same_checks(checkpoint_dir, capsys):
    """The checks run on every start; they must pass a good checkpoint of each kind (MoE, q-LoRA, MQA)."""
    from cluster.cli import preflight

    for kind in ("v2_lite", "v2_236b", "llama_mqa"):
        assert preflight(str(checkpoint_dir(kind))).vocab_size == 512


def run_up(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(home)}  # never the user's cache
    return subprocess.run([sys.executable, "-m", "cluster.cli", "up", *args], env=env, capture_output=True,
                          text=True, timeout=UP_TIMEOUT_S, check=False)


@pytest.fixture(scope="module")
def up_runs(broken, tmp_path_factory):
    """`moe-serve up` on each UP_CASES checkpoint and on a YAML config with wrong fields, a few at a time."""
    home = tmp_path_factory.mktemp("home")
    typo = tmp_path_factory.mktemp("yaml") / "typo.yaml"
    typo.write_text("model:\n  dtype: float32\n  bogus: 1\nscheduler:\n  max_num_seqs: lots\n")
    runs = {case: ["--model", str(broken(case))] for case in UP_CASES} | {"typo.yaml": [str(typo)]}
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        done = dict(zip(runs, pool.map(lambda args: run_up(args, home), runs.values())))
    return done, typo


@pytest.mark.parametrize("case", UP_CASES)
def test_up_fails_before_ray_with_one_line_naming_the_file(up_runs, broken, case):
    proc = up_runs[0][case]
    assert proc.returncode == 2, proc.stderr
    assert "starting Ray" not in proc.stdout  # found up front, not in a Serve replica
    assert_one_clean_error(proc.stderr, expected(case, broken(case)))


def test_up_with_a_bad_yaml_config_names_the_file_and_fields(up_runs, tmp_path, capsys):
    proc, typo = up_runs[0]["typo.yaml"], up_runs[1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "starting Ray" not in proc.stdout
    assert proc.stderr.splitlines() == [  # one line per wrong field
        f"moe-serve: error: {typo}: model.bogus: unknown field; known: path, shapes, name, dtype, device, "
        + "random_weights, enforce_eager",
        f"{typo}: scheduler.max_num_seqs: Input should be a valid integer (got 'lots')"]
    (tmp_path / "broken.yaml").write_text("model: [\n")
    for name, says in (("broken.yaml", ":2: not valid YAML"), ("absent.yaml", ": cannot read the config file")):
        assert main(["up", str(tmp_path / name)]) == 2  # fails before Ray is even imported
        assert_one_clean_error(capsys.readouterr().err, [f"{tmp_path / name}{says}"])
