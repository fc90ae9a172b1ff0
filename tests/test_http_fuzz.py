"""Bad input over HTTP: schemathesis generates requests from our OpenAPI schema (valid and invalid ones); none may get
a 5xx. The engine is the fake one with the real tokenizer and chat template, so every request runs to its end fast.
Plus the inputs the issue names: lone surrogates, malformed JSON, wrong types."""

from types import SimpleNamespace

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from router.async_engine import AsyncEngine
from router.engine_config import EngineConfig
from router.llm_engine import LLMEngine, load_tokenizer
from router.openai_server import build_app
from tests.fake_runner import FakeExecutor


@pytest.fixture(scope="module")
def app(checkpoint_dir):
    tokenizer = load_tokenizer(checkpoint_dir("v2_lite"))
    model_config = SimpleNamespace(vocab_size=1000, max_position_embeddings=4096, eos_token_ids=())
    engine = AsyncEngine(LLMEngine(EngineConfig(block_size=4), model_config, FakeExecutor(256, 4), tokenizer))
    yield build_app(engine, "fake")
    engine.shutdown()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_generated_request_gets_a_server_error(app, mode):
    """Cases drawn from every operation of the served OpenAPI schema, valid (positive) and invalid (negative)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8  # the schema is served and holds our endpoints
    tried = 0
    for operation in operations:  # each operation its own budget of examples
        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call()
            assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text)
            if response.status_code >= 400:
                assert response.json()["error"]["message"]

        try:
            check()
            tried += 1
        except Unsatisfiable:  # an operation that takes no constrained input has no invalid request to make
            assert mode == "negative", operation.label
    assert tried >= (len(operations) if mode == "positive" else 5), f"only {tried} operations could be fuzzed"


@pytest.mark.parametrize("path, body, says", [
    ("/v1/completions", '{"prompt": "\\ud800abc", "max_tokens": 2}', "lone surrogate"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "lone surrogate"),
    ("/v1/completions", '{"prompt": "ok", "stop": ["\\ud800"], "max_tokens": 2}', "lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udc00"}]}', "lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "model": "\\ud800"}',
     "lone surrogate"),
    ("/tokenize", '{"prompt": "\\ud800"}', "lone surrogate"),
    ("/v1/completions", '{"prompt": "ok", "max_tokens": "many"}', "max_tokens"),
    ("/v1/completions", '{"prompt": "ok", "n": 0}', "n must be"),
    ("/v1/completions", '{"prompt": "ok", "n": 100000000}', "n must be"),
    ("/v1/chat/completions", '{"messages": "hi"}', "messages"),
    ("/v1/chat/completions", '[1, 2]', "valid dictionary"),
    ("/v1/completions", '{"prompt": "ok"', "JSON"),
    ("/v1/sessions", '{"ttl_s": "forever"}', "ttl_s"),
])
def test_bad_input_gets_a_400_that_says_what_is_wrong(app, path, body, says):
    with TestClient(app, raise_server_exceptions=False) as http:
        r = http.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]
