"""LLMEngine: requests in, tokens out. `step()` is schedule -> run -> postprocess."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import NamedTuple

import torch

from router.engine_config import EngineConfig
from router.scheduler import Scheduled, Scheduler
from router.sequence import Sequence
from workers.block_manager import BlockManager
from workers.causal_lm import CausalLM
from workers.checkpoint import Checkpoint
from workers.config import ModelConfig, resolve_dtype
from workers.grouped_mm import select_grouped_mm
from workers.kv_cache import KVCache, bytes_per_token
from workers.loader import build_model
from workers.model_runner import ModelRunner, SeqChunk
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class RequestOutput(NamedTuple):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


class LLMEngine:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, runner: ModelRunner, tokenizer=None):
        self.config = config
        self.model_config = model_config
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = config.model_len(model_config.max_position_embeddings)
        cache = runner.kv_cache
        self.scheduler = Scheduler(config, BlockManager(cache.num_blocks, cache.block_size))
        self.eos_ids = set(model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        if config.model is None:
            raise ValueError("no model directory given (--model DIR)")
        model_dir = Path(config.model)
        model_config = ModelConfig.from_pretrained(model_dir)
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                              else config.device)
        dtype = resolve_dtype(config.dtype, device)
        checkpoint = None if config.random_weights else Checkpoint(model_dir)
        model = build_model(CausalLM, model_config, device, dtype, checkpoint, seed=config.seed,
                            grouped_mm=select_grouped_mm(device, dtype))
        max_len = config.model_len(model_config.max_position_embeddings)
        if device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(device)[0] * config.gpu_memory_utilization)
        else:
            budget = int(config.kv_cache_gib * 2**30)
        kv_cache = KVCache.from_budget(model_config, budget, config.block_size, dtype, device,
                                       max_blocks=config.max_num_seqs * -(-max_len // config.block_size) + 1)
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", kv_cache.num_blocks, config.block_size,
                 kv_cache.num_blocks * bytes_per_token(model_config, dtype) * config.block_size / 2**30)
        return cls(config, model_config, ModelRunner(model, kv_cache, device), load_tokenizer(model_dir))

    # --- requests ---

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.max_model_len}")
        cache = self.runner.kv_cache
        if -(-len(prompt_ids) // cache.block_size) > cache.num_blocks:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the KV cache holds {cache.num_slots}")
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        seq = Sequence(next(self._ids), list(prompt_ids), params, generator=gen)
        self.scheduler.add(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # --- the hot path ---

    def step(self) -> list[Sequence]:
        """One forward pass; returns the sequences that finished in it."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            raise RuntimeError("the scheduler found nothing to run: the KV cache is too small for any waiting prompt")
        tokens = self.runner.step([self._chunk(s) for s in scheduled])
        return self._postprocess(scheduled, tokens)

    @staticmethod
    def _chunk(s: Scheduled) -> SeqChunk:
        seq = s.seq
        return SeqChunk(seq.token_slice(seq.num_cached, seq.num_cached + s.num_new), seq.num_cached,
                        seq.block_table, s.sample, seq.params, seq.generator)

    def _postprocess(self, scheduled: list[Scheduled], tokens: list[int]) -> list[Sequence]:
        finished, sampled = [], iter(tokens)
        for s in scheduled:
            seq = s.seq
            seq.num_cached += s.num_new
            if not s.sample:
                continue
            seq.output_ids.append(next(sampled))
            reason = self._finish_reason(seq)
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence) -> str | None:
        p, token = seq.params, seq.output_ids[-1]
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if p.stop and self.tokenizer is not None:
            text = self.decode(seq.output_ids)
            hits = [text.index(s) for s in p.stop if s in text]
            if hits:
                seq.text = text[: min(hits)]
                return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def output(self, index: int, seq: Sequence) -> RequestOutput:
        text = seq.text if seq.text is not None else self.decode(seq.output_ids)
        return RequestOutput(index, text, list(seq.output_ids), seq.finish_reason, len(seq.prompt_ids))

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        """Runs a whole batch to completion; outputs in input order."""
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        return [self.output(i, s) for i, s in enumerate(seqs)]


def load_tokenizer(model_dir: Path):
    """The checkpoint's own tokenizer and chat template, from local files only; None if it ships none."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
