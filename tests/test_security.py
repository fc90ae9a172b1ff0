"""Security: request size limits on the real uvicorn-served app; listening on 127.0.0.1 unless told otherwise;
nothing from a request or a checkpoint is unpickled or executed (a static check over the serving code, and a
checkpoint whose remote code and pickle would leave a marker file); sessions are bound to the API key that made them."""

import ast
import json
import pickle
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from cluster.cli import build_parser, overrides
from cluster.serve_config import ServeConfig
from router.async_engine import AsyncEngine
from router.engine_config import EngineConfig
from router.llm_engine import LLMEngine, load_tokenizer
from router.openai_server import ServerLimits, build_app
from tests.fake_runner import FakeExecutor
from tests.harness import served
from workers.checkpoint import Checkpoint
from workers.config import ModelConfig
from workers.loader import check_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SERVING_CODE = ("router", "cluster", "workers", "proto")
LIMITS = ServerLimits(api_keys=("key-a", "key-b"))  # the default size limits
KEY_A, KEY_B = ({"Authorization": f"Bearer {k}"} for k in LIMITS.api_keys)
REPLY_TIMEOUT_S = 30


# --- request limits, on the app as uvicorn serves it ---

@pytest.fixture(scope="module")
def url(checkpoint_dir):
    tokenizer = load_tokenizer(checkpoint_dir("v2_lite"))
    model_config = SimpleNamespace(vocab_size=1000, max_position_embeddings=4096, eos_token_ids=())
    engine = AsyncEngine(LLMEngine(EngineConfig(block_size=4), model_config, FakeExecutor(256, 4), tokenizer))
    with served(build_app(engine, "fake", LIMITS)) as url:
        yield url
    engine.shutdown()


def raw_request(url: str, head: bytes, body_chunks=()) -> tuple[int, dict]:
    """Sends a raw HTTP/1.1 request (head without its final blank line) and returns (status, JSON body); the body
    is sent chunked, and sending stops early if the server answers and closes first."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=REPLY_TIMEOUT_S) as s:
        s.sendall(head + b"\r\n")
        try:
            for chunk in body_chunks:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            s.sendall(b"0\r\n\r\n")
        except OSError:  # refused mid-body: the answer is already there to read
            pass
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply) < reply.index(b"\r\n\r\n") + 4 + content_length(reply):
            data = s.recv(65536)
            if not data:
                break
            reply += data
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1] or b"null")


def content_length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def head(path: str = "/health", method: str = "GET", extra: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode() + extra


def still_serving(url: str) -> bool:
    ok = httpx.post(url + "/v1/completions", headers=KEY_A, timeout=REPLY_TIMEOUT_S,
                    json={"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0})
    return ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_body_over_the_limit_is_413_declared_or_streamed(url):
    over = LIMITS.max_body_bytes + 1
    r = httpx.post(url + "/v1/completions", headers=KEY_A, content=b"x" * over, timeout=REPLY_TIMEOUT_S)
    assert r.status_code == 413 and f"over {LIMITS.max_body_bytes} bytes" in r.json()["error"]["message"]
    chunk = b"y" * 2**20
    status, body = raw_request(url, head("/v1/completions", "POST", b"Authorization: Bearer key-a\r\n"
                                         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"),
                               [chunk] * (over // len(chunk) + 1))
    assert status == 413 and f"over {LIMITS.max_body_bytes} bytes" in body["error"]["message"]
    assert still_serving(url)


@pytest.mark.parametrize("extra, says", [
    (b"X-Big: " + b"a" * (LIMITS.max_header_bytes + 1) + b"\r\n", f"over {LIMITS.max_header_bytes} bytes"),
    (b"X-Big: " + b"a" * 2**24 + b"\r\n", f"over {LIMITS.max_header_bytes} bytes"),  # 16 MiB, one line
    (b"".join(b"X-H%d: v\r\n" % i for i in range(LIMITS.max_headers + 1)), f"at most {LIMITS.max_headers}"),
    (b"".join(b"X-H%d: v\r\n" % i for i in range(100_000)), f"at most {LIMITS.max_headers}"),
])
def test_too_large_or_too_many_headers_are_431_and_the_server_goes_on(url, extra, says):
    status, body = raw_request(url, head(extra=extra))
    assert status == 431 and says in body["error"]["message"]
    assert still_serving(url)


def test_headers_within_the_limits_pass(url):
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(LIMITS.max_headers // 2))
    assert raw_request(url, head(extra=extra + b"X-Big: " + b"a" * (LIMITS.max_header_bytes // 2) + b"\r\n")) == \
        (200, {"status": "ok"})


# --- sessions are bound to the API key that made them, over HTTP ---

def test_another_keys_session_does_not_exist_for_you(url):
    sid = httpx.post(url + "/v1/sessions", json={}, headers=KEY_A).json()["id"]
    turn = {"prompt": [1, 2, 3], "max_tokens": 2}
    assert httpx.get(f"{url}/v1/sessions/{sid}", headers=KEY_B).status_code == 404
    assert httpx.delete(f"{url}/v1/sessions/{sid}", headers=KEY_B).status_code == 404
    assert httpx.post(url + "/v1/completions", json=turn, headers={**KEY_B, "X-Session-ID": sid}).status_code == 404
    for no_key in ({}, {"Authorization": "Bearer key-c"}):
        assert httpx.get(f"{url}/v1/sessions/{sid}", headers=no_key).status_code == 401
        assert httpx.post(url + "/v1/sessions", json={}, headers=no_key).status_code == 401
    assert httpx.get(f"{url}/v1/sessions/{sid}", headers=KEY_A).status_code == 200  # B's tries left it alone
    assert httpx.post(url + "/v1/completions", json=turn, headers={**KEY_A, "X-Session-ID": sid}).status_code == 200


# --- listening on 127.0.0.1 unless told otherwise ---

def test_up_listens_on_loopback_unless_host_is_given():
    parse = build_parser().parse_args
    assert ServeConfig.load(None, overrides(parse(["up"]))).server.host == "127.0.0.1"
    assert ServeConfig.load(str(ROOT / "configs/tiny-cpu.yaml"), overrides(parse(["up"]))).server.host == "127.0.0.1"
    assert ServeConfig.load(None, overrides(parse(["up", "--host", "0.0.0.0"]))).server.host == "0.0.0.0"
    from ray.serve.config import HTTPOptions

    assert HTTPOptions().host == "127.0.0.1"  # `serve run cluster.serve_app:app_builder` takes Serve's host


# --- nothing is unpickled or executed ---

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
PICKLE_READS = {"load", "loads", "Unpickler", "open"}
UNSAFE_CALLS = {"torch.load", "yaml.unsafe_load", "yaml.full_load", "numpy.load", "np.load"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}


def dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def unsafe_uses(source: str, filename: str = "<snippet>") -> list[str]:
    """Where `source` unpickles, evaluates, executes or trusts remote code: pickle-family loads (or imports from
    those modules), torch.load, numpy.load, eval/exec, yaml.load without a safe loader, trust_remote_code not
    literally False."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        parts = name.split(".")
        kwargs = {k.arg: k.value for k in node.keywords}
        loader = dotted(kwargs.get("Loader", ast.Constant(None))).split(".")[-1]
        if (name in ("eval", "exec", "builtins.eval", "builtins.exec", "__import__") or name in UNSAFE_CALLS
                or len(parts) >= 2 and parts[-2] in PICKLE_MODULES and parts[-1] in PICKLE_READS
                or name in ("yaml.load", "yaml.load_all") and loader not in SAFE_YAML_LOADERS):
            found.append(f"{where}: {name}(...)")
        trust = kwargs.get("trust_remote_code")
        if "trust_remote_code" in kwargs and not (isinstance(trust, ast.Constant) and trust.value is False):
            found.append(f"{where}: trust_remote_code={ast.unparse(trust)}")
    return found


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.loads(request_body)",
    "import pickle\nwith open(p, 'rb') as f:\n    pickle.load(f)",
    "from pickle import loads\nloads(b)",
    "import ray.cloudpickle as cloudpickle\ncloudpickle.loads(b)",
    "import torch\nstate = torch.load(path)",
    "state = torch.load(path, weights_only=True)",
    "eval(user_text)",
    "exec(code, {})",
    "yaml.load(text)",
    "yaml.load(text, Loader=yaml.Loader)",
    "yaml.unsafe_load(text)",
    "np.load(path, allow_pickle=True)",
    "AutoTokenizer.from_pretrained(d, trust_remote_code=True)",
    "AutoConfig.from_pretrained(d, trust_remote_code=args.trust)",
])
def test_the_scanner_finds_each_unsafe_use(snippet):
    assert len(unsafe_uses(snippet)) == 1, snippet


def test_the_scanner_passes_safe_code():
    safe = ("yaml.safe_load(text)\nyaml.load(text, Loader=yaml.SafeLoader)\nmodel.eval()\njson.loads(body)\n"
            "AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=False)\nsafe_open(p)\n")
    assert unsafe_uses(safe) == []


def test_serving_code_never_unpickles_or_executes():
    files = [p for d in SERVING_CODE for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50  # the scan saw the code
    found = [hit for p in files for hit in unsafe_uses(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


class Touch:
    """Unpickling this creates `path`: what a malicious pytorch_model.bin does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


REMOTE_CODE = "from pathlib import Path\nPath(__file__).with_name('MARKER').write_text('remote code ran')\n"
REMOTE_CLASSES = "class EvilConfig: pass\nclass EvilModel: pass\nclass EvilTokenizer: pass\n"


def test_a_checkpoint_with_remote_code_and_pickles_loads_without_running_either(checkpoint_dir, tmp_path):
    d = shutil.copytree(checkpoint_dir("llama_mha"), tmp_path / "ck")
    marker = d / "MARKER"
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (d / f"{module}.py").write_text(REMOTE_CODE + REMOTE_CLASSES)
    tokenizer_map = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    for name, auto_map in (("config.json", {"AutoConfig": "configuration_evil.EvilConfig",
                                            "AutoModelForCausalLM": "modeling_evil.EvilModel", **tokenizer_map}),
                           ("tokenizer_config.json", tokenizer_map)):
        (d / name).write_text(json.dumps({**json.loads((d / name).read_text()), "auto_map": auto_map}))
    payload = pickle.dumps(Touch(marker))
    pickle.loads(payload)  # the payload is live: unpickling it makes the marker
    assert marker.exists()
    marker.unlink()
    for name in ("pytorch_model.bin", "training_args.bin", "model.pt"):
        (d / name).write_bytes(payload)

    assert ModelConfig.from_pretrained(d).architecture == "llama"
    assert check_checkpoint(str(d)).architecture == "llama"
    assert load_tokenizer(d).encode("hi")
    engine = LLMEngine.from_config(EngineConfig(model=str(d), device="cpu", dtype="float32", kv_cache_gib=0.01))
    engine.shutdown()
    assert {ref.path.suffix for ref in Checkpoint(d).tensors.values()} == {".safetensors"}
    assert not marker.exists()
