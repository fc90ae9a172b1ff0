"""Helpers that drive our model the way the engine does, and transformers the way users do."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from router.engine_config import EngineConfig
from router.llm_engine import LLMEngine
from workers.block_manager import BlockManager
from workers.model_runner import SeqChunk
from workers.sampler import SampleRow
from workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
DEVICE = os.environ.get("MOE_SERVE_TEST_DEVICE", "cpu")  # benchmarks/gpu_check.py runs these tests on cuda


def packing_dtypes() -> list:
    """pytest params of the dtype names that weight packing (workers/packed_linear.py) takes on this CPU; the
    others are skipped."""
    import pytest

    from workers.packed_linear import packing_helps

    return [pytest.param(name, marks=pytest.mark.skipif(not packing_helps(torch.device("cpu"), getattr(torch, name)),
                                                        reason="no oneDNN kernels for it here"))
            for name in ("float32", "bfloat16")]


def engine(model_dir, **kw) -> LLMEngine:
    kw.setdefault("device", DEVICE)
    kw.setdefault("dtype", "float32")
    kw.setdefault("kv_cache_gib", 0.05)
    return LLMEngine.from_config(EngineConfig(model=str(model_dir), **kw))


def generate_tokens(eng: LLMEngine, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    """Each prompt's (first sample's) output token ids, the whole batch run together."""
    return [out.outputs[0].token_ids for out in eng.generate(prompts, [params] * len(prompts))]


def prefill_logits(eng: LLMEngine, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All-position logits of a batch of prompts in one forward pass, cached into fresh blocks (with room for one
    token more, so a decode step can follow)."""
    bm = BlockManager(eng.executor.runner.kv_cache.num_blocks, eng.executor.runner.kv_cache.block_size)
    chunks = []
    for p in prompts:
        table: list[int] = []
        bm.grow(table, len(p) + 1)
        chunks.append(SeqChunk(p, 0, table, (SampleRow(GREEDY, 0, None, p, []),)))
    logits = eng.executor.runner.forward_logits(chunks, all_positions=True)
    return list(logits.split([len(p) for p in prompts])), chunks


def decode_chunks(eng: LLMEngine, prompts: list[list[int]], first_token: int = 11) -> list[SeqChunk]:
    """The prompts prefilled, then one decode step for each: prompt i's next token is first_token + i."""
    _, chunks = prefill_logits(eng, prompts)
    return [c._replace(token_ids=[first_token + i], start=len(p)) for i, (c, p) in enumerate(zip(chunks, prompts))]


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    return model.to(DEVICE).eval()


@torch.no_grad()
def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt], device=DEVICE)).logits[0].float()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int = 32) -> list[int]:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None  # else generate() takes the model's EOS and stops there
    ids = torch.tensor([prompt], device=DEVICE)
    # an explicit mask: otherwise generate() takes prompt tokens equal to pad_token_id for padding
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return out[0, len(prompt):].tolist()


def random_prompts(lengths, vocab: int = 256, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def parsed(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text as (name, labels, value) rows."""
    rows = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            name, _, rest = head.partition("{")
            labels = dict(item.split("=", 1) for item in rest.rstrip("}").split(",") if item)
            rows.append((name, {k: v.strip('"') for k, v in labels.items()}, float(value)))
    return rows


def sse_events(response) -> Iterator[dict]:
    """The JSON events of an httpx streaming response (SSE), split on blank lines only: the text in an event may
    hold characters that str.splitlines() (and so httpx's iter_lines) takes for line breaks."""
    buffer = b""
    for chunk in response.iter_bytes():
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            data = event.decode().removeprefix("data: ")
            if data.startswith("{"):
                yield json.loads(data)


@contextmanager
def served(app) -> Iterator[str]:
    """An ASGI app served by uvicorn on a free loopback port, in a thread of its own; yields its base URL."""
    import uvicorn

    from workers.multiproc_executor import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def grpc_served(servicer):
    """serve_grpc (as `moe-serve` runs it) for a GrpcServicer on a free port, on an event loop thread of its own;
    yields a channel to it."""
    import asyncio

    import grpc

    from router.grpc_server import serve_grpc

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server, port = asyncio.run_coroutine_threadsafe(serve_grpc(servicer), loop).result(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)


def experts_of(w13: torch.Tensor, w2: torch.Tensor):
    """An Experts module holding these weights ([E, 2I, D] and [E, D, I]), without a model config."""
    from workers.experts import Experts

    experts = Experts.__new__(Experts)
    torch.nn.Module.__init__(experts)
    experts.expert_ids, experts.intermediate = tuple(range(w13.shape[0])), w2.shape[-1]
    experts.w13, experts.w2 = torch.nn.Parameter(w13.detach()), torch.nn.Parameter(w2.detach())
    return experts
