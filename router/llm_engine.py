"""LLMEngine: requests in, tokens out. `step()` is schedule -> run -> postprocess."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch

from router.detokenizer import IncrementalDetokenizer
from router.engine_config import EngineConfig
from router.engine_stats import EngineStats
from router.request_output import CompletionOutput, RequestOutput
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
from workers.sampler import SampleResult, SampleRow
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, runner: ModelRunner, tokenizer=None):
        self.config = config
        self.model_config = model_config
        self.runner = runner
        self.tokenizer = tokenizer
        cache = runner.kv_cache
        self.max_model_len = fit_model_len(config, model_config, cache.num_slots)
        self.scheduler = Scheduler(config, BlockManager(cache.num_blocks, cache.block_size,
                                                        config.enable_prefix_caching))
        self.eos_ids = set(model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.requests: dict[str, list[Sequence]] = {}  # unfinished requests: all their samples
        self._seq_ids = itertools.count()

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

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError, with what to fix, for a request this engine cannot take."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                             f"{self.max_model_len}, so at most {self.max_model_len - 1} prompt tokens")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this checkpoint ships none; use stop_token_ids")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        self.validate(prompt_ids, params)
        request_id = str(next(self._seq_ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt_ids = list(prompt_ids)
        seqs = [self._new_sequence(request_id, i, prompt_ids, params) for i in range(params.n)]
        seqs[0].forks = seqs[1:]  # they branch off when the prompt is done, sharing its blocks
        self.requests[request_id] = seqs
        self.scheduler.add(seqs[0])
        return request_id

    def _new_sequence(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + index)
        detok = None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer, prompt_ids, params)
        return Sequence(next(self._seq_ids), request_id, index, prompt_ids, params, gen, detokenizer=detok)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its blocks; its last output (finish_reason "abort"), or None if unknown."""
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return None
        outputs = []
        for seq in seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
                outputs.append(CompletionOutput(seq.index, "", [], None, "abort"))
        return RequestOutput(request_id, seqs[0].prompt_ids, outputs, True, 0)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        blocks = self.scheduler.blocks
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), blocks.usage,
                           blocks.prefix_hit_rate, self.scheduler.num_preemptions, blocks.num_blocks,
                           blocks.block_size)

    # --- the hot path ---

    def step(self) -> list[RequestOutput]:
        """One forward pass: schedule -> run -> postprocess. Returns what each request gained."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        results = self.runner.step([self._chunk(s) for s in scheduled])
        return self._postprocess(scheduled, results)

    @staticmethod
    def _chunk(s: Scheduled) -> SeqChunk:
        seq = s.seq
        samples = ()
        if s.sample:
            samples = tuple(SampleRow(q.params, q.generator, q.prompt_ids, q.output_ids) for q in [seq, *seq.forks])
        return SeqChunk(seq.token_slice(seq.num_cached, seq.num_cached + s.num_new), seq.num_cached,
                        seq.block_table, samples)

    def _postprocess(self, scheduled: list[Scheduled], results: list[SampleResult]) -> list[RequestOutput]:
        moved: dict[str, list[CompletionOutput]] = {}
        results_iter = iter(results)
        blocks = self.scheduler.blocks
        for s in scheduled:
            seq = s.seq
            seq.num_cached += s.num_new
            blocks.commit(seq)
            if not s.sample:
                continue
            for sample in [seq, *self._fork(seq)]:
                moved.setdefault(seq.request_id, []).append(self._append(sample, next(results_iter)))
        outputs = []
        for request_id, deltas in moved.items():
            seqs = self.requests[request_id]
            finished = all(q.finished for q in seqs)
            if finished:
                del self.requests[request_id]
            outputs.append(RequestOutput(request_id, seqs[0].prompt_ids, deltas, finished, seqs[0].num_prompt_hit))
        return outputs

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """seq's other samples, branching off now that its prompt is computed: they share its full blocks."""
        forks, seq.forks = seq.forks, []
        blocks = self.scheduler.blocks
        shared = seq.num_cached // blocks.block_size
        for child in forks:
            child.block_table = blocks.fork(seq.block_table, shared)
            child.block_hashes = seq.block_hashes[:shared]
            child.num_cached = shared * blocks.block_size
            child.num_prompt_hit = seq.num_prompt_hit
            self.scheduler.add_running(child)
        return forks

    def _append(self, seq: Sequence, result: SampleResult) -> CompletionOutput:
        """Adds a sampled token to seq, decides whether seq is done, and returns what it gained."""
        p, token = seq.params, result.token_id
        seq.output_ids.append(token)
        if result.logprobs is not None:
            seq.logprobs.append(result.logprobs)
        stop_token = (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids
        if seq.detokenizer is not None and (not stop_token or p.include_stop_str_in_output):
            if seq.detokenizer.add(token):
                seq.finish_reason = "stop"
        if stop_token:
            seq.finish_reason = "stop"
        elif seq.finish_reason is None and (len(seq.output_ids) >= p.max_tokens or
                                            seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finished:
            self.scheduler.finish(seq)
        text = seq.detokenizer.delta(seq.finished) if seq.detokenizer is not None else ""
        logprobs = None if result.logprobs is None else [result.logprobs]
        return CompletionOutput(seq.index, text, [token], logprobs, seq.finish_reason)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        """Runs a whole batch to completion; one merged output per prompt, in input order."""
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        merged: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                merged[out.request_id] = merged[out.request_id].merge(out) if out.request_id in merged else out
        return [merged[i] for i in ids]


def fit_model_len(config: EngineConfig, model_config: ModelConfig, cache_slots: int) -> int:
    """The longest sequence served: the configured or the model's length, within what the cache holds."""
    wanted = config.model_len(model_config.max_position_embeddings)
    if wanted <= cache_slots:
        return wanted
    if config.max_model_len is not None:
        raise ValueError(f"max_model_len {wanted} does not fit in the KV cache ({cache_slots} tokens); "
                         "raise the cache budget or lower max_model_len")
    log.warning("serving at most %d tokens per sequence (the KV cache's size), below the model's %d",
                cache_slots, wanted)
    return cache_slots


def load_tokenizer(model_dir: Path):
    """The checkpoint's own tokenizer and chat template, from local files only; None if it ships none."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
