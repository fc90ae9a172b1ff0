"""LLMEngine: requests in, tokens out. `step()` is schedule -> run -> postprocess."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from router.detokenizer import IncrementalDetokenizer
from router.engine_config import EngineConfig
from router.engine_stats import EngineStats
from router.request_output import CompletionOutput, RequestOutput
from router.resumed_sample import ResumedSample
from router.scheduler import Scheduled, Scheduler
from router.sequence import Sequence
from router.session_pins import SessionPins
from router.stream_interval import StreamInterval
from router.worker_stats import WorkerStats
from workers.block_manager import BlockManager
from workers.checkpoint import CheckpointError
from workers.config import ModelConfig
from workers.executor import Executor, LocalExecutor
from workers.model_runner import SeqChunk, StepPlan, build_runner
from workers.sampler import SampleResult, SampleRow
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, executor: Executor, tokenizer=None):
        self.config = config
        self.model_config = model_config
        self.executor = executor
        self.tokenizer = tokenizer
        bs = executor.block_size
        self.max_model_len = fit_model_len(config, model_config, min(executor.num_blocks) * bs)
        self.schedulers = [Scheduler(config, BlockManager(n, bs, config.enable_prefix_caching))
                           for n in executor.num_blocks]  # one per attention rank
        self.released: list[list[int]] = [[] for _ in self.schedulers]  # finished seq ids, per rank
        self.sessions = SessionPins([s.blocks for s in self.schedulers], config.session_cache_fraction,
                                    config.session_ttl_s)
        self.eos_ids = set(model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.requests: dict[str, list[Sequence]] = {}  # unfinished requests: all their samples
        self.stream = StreamInterval(config.stream_interval)  # which outputs each step streams
        self._seq_ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig, executor_cls=None) -> "LLMEngine":
        """executor_cls(config, model_config) runs the workers when there are any (default MultiprocExecutor).
        Whole or not at all: if anything fails, the workers already started are stopped."""
        if config.model is None:
            raise ValueError("no model directory given (--model DIR)")
        model_dir = Path(config.model)
        model_config = ModelConfig.from_pretrained(model_dir)
        if not config.multiprocess:
            executor = LocalExecutor(build_runner(config, model_config))
        elif executor_cls is None:
            from workers.multiproc_executor import MultiprocExecutor

            executor = MultiprocExecutor(config, model_config)
        else:
            executor = executor_cls(config, model_config)
        try:
            return cls(config, model_config, executor, load_tokenizer(model_dir))
        except BaseException:
            executor.shutdown()
            raise

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler, when there is one attention rank."""
        (only,) = self.schedulers
        return only

    def shutdown(self) -> None:
        self.executor.shutdown()

    def worker_stats(self, previous: WorkerStats | None = None) -> WorkerStats:
        """What each worker has done so far. The expert workers report in a round of their own: call between steps."""
        return WorkerStats.from_profile(self.executor.profile(), previous)

    # --- requests ---

    def validate(self, prompt_ids: list[int], params: SamplingParams, resumed: tuple[ResumedSample, ...] = ()) -> None:
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
        for r in resumed:
            if not 0 <= r.index < params.n or any(not 0 <= t < vocab for t in r.token_ids) or \
                    len(r.token_ids) >= params.max_tokens or len(prompt_ids) + len(r.token_ids) >= self.max_model_len:
                raise ValueError(f"resumed sample {r.index} does not fit the request")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    session_id: str | None = None, resumed: tuple[ResumedSample, ...] = ()) -> str:
        """Queues a request. With a session id, its history is pinned in the cache when it finishes, for the
        session's next turn (which goes to the same attention rank). `resumed`: the request's unfinished samples,
        begun on another engine; each goes on from its tokens as a sequence of its own (its prompt blocks shared
        through the prefix cache), as a preempted one would."""
        self.validate(prompt_ids, params, resumed)
        if session_id is not None and params.n != 1:
            raise ValueError("a session request has one sample: n must be 1")
        request_id = str(next(self._seq_ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt_ids = list(prompt_ids)
        if resumed:
            seqs = [self._new_sequence(request_id, r.index, prompt_ids, params, r) for r in resumed]
        else:
            seqs = [self._new_sequence(request_id, i, prompt_ids, params) for i in range(params.n)]
            seqs[0].forks = seqs[1:]  # they branch off when the prompt is done, sharing its blocks
        seqs[0].session_id = session_id
        rank = self.sessions.rank_of(session_id) if session_id is not None else None
        rank = self._pick_rank(prompt_ids) if rank is None else rank
        for seq in seqs:
            seq.rank = rank
        self.requests[request_id] = seqs
        for seq in seqs if resumed else seqs[:1]:
            self.schedulers[rank].add(seq)
        return request_id

    def _pick_rank(self, prompt_ids: list[int]) -> int:
        """The attention rank with the least work once this prompt is on it: what it has left to compute, plus
        the prompt less what that rank's prefix cache already holds of it."""
        if len(self.schedulers) == 1:
            return 0
        probe = Sequence(-1, "", 0, prompt_ids, SamplingParams())

        def cost(rank: int) -> tuple[int, int]:
            sched = self.schedulers[rank]
            outstanding = sum(q.num_to_compute for q in (*sched.running, *sched.waiting))
            hit = len(sched.blocks.match_prefix(probe)) * sched.blocks.block_size
            return outstanding + len(prompt_ids) - hit, rank

        return min(range(len(self.schedulers)), key=cost)

    def _new_sequence(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams,
                      resumed: ResumedSample | None = None) -> Sequence:
        detok = None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer, prompt_ids, params)
        seq = Sequence(next(self._seq_ids), request_id, index, prompt_ids, params, detokenizer=detok)
        if resumed is not None:
            seq.output_ids = list(resumed.token_ids)
            seq.num_resumed = len(resumed.token_ids)
            if detok is not None:
                detok.resume(resumed.token_ids, resumed.text_len)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its blocks; its last output (finish_reason "abort"), or None if unknown."""
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return None
        self.stream.drop(request_id)
        outputs = []
        for seq in seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self._finish(seq)
                outputs.append(CompletionOutput(seq.index, "", [], None, "abort"))
        return RequestOutput(request_id, seqs[0].prompt_ids, outputs, True, 0)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def end_session(self, session_id: str) -> None:
        """Lets go of a session's pinned history."""
        self.sessions.drop(session_id)

    def stats(self) -> EngineStats:
        """Summed over the attention ranks (usage and hit rate over all their blocks and queries)."""
        scheds = self.schedulers
        managers = [s.blocks for s in scheds]
        num_blocks = sum(b.num_blocks for b in managers)
        queries = sum(b.prefix_queries for b in managers)
        return EngineStats(sum(len(s.running) for s in scheds), sum(len(s.waiting) for s in scheds),
                           sum(b.usage * b.num_blocks for b in managers) / num_blocks,
                           sum(b.prefix_hits for b in managers) / queries if queries else 0.0,
                           sum(s.num_preemptions for s in scheds), num_blocks, self.executor.block_size,
                           sum(q.num_to_compute + q.params.max_tokens - len(q.output_ids)
                               for s in scheds for q in (*s.running, *s.waiting)))

    # --- the hot path ---

    def step(self) -> list[RequestOutput]:
        """One forward pass: schedule -> run -> postprocess. Returns what each request gained (held back and merged
        between a request's first and last outputs, with a stream_interval over 1)."""
        self.sessions.expire()
        scheduled = [self._schedule(rank) for rank in range(len(self.schedulers))]  # per attention rank
        if not any(scheduled):
            return []
        plans = [StepPlan([self._chunk(s) for s in batch], tuple(self.released[rank]))
                 for rank, batch in enumerate(scheduled)]
        for released in self.released:
            released.clear()
        results = self.executor.execute(plans)
        outputs = self._postprocess([s for batch in scheduled for s in batch], [r for rank in results for r in rank])
        return self.stream(outputs)

    def _schedule(self, rank: int) -> list[Scheduled]:
        """The rank's batch. A rank whose work cannot move for want of blocks that sessions hold between turns (a
        request as long as the whole cache) takes them back, least recently used session first."""
        sched = self.schedulers[rank]
        batch = sched.schedule()
        while not batch and sched.has_work() and self.sessions.evict(rank):
            batch = sched.schedule()
        return batch

    @staticmethod
    def _chunk(s: Scheduled) -> SeqChunk:
        seq = s.seq
        samples = ()
        if s.sample:
            samples = tuple(sample_row(q) for q in [seq, *seq.forks])
        return SeqChunk(seq.token_slice(seq.num_cached, seq.num_cached + s.num_new), seq.num_cached,
                        seq.block_table, samples)

    def _postprocess(self, scheduled: list[Scheduled], results: list[SampleResult]) -> list[RequestOutput]:
        moved: dict[str, list[CompletionOutput]] = {}
        results_iter = iter(results)
        for s in scheduled:
            seq = s.seq
            seq.num_cached += s.num_new
            self.schedulers[seq.rank].blocks.commit(seq)
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
        scheduler = self.schedulers[seq.rank]
        blocks = scheduler.blocks
        shared = seq.num_cached // blocks.block_size
        for child in forks:
            child.block_table = blocks.fork(seq.block_table, shared)
            child.block_hashes = seq.block_hashes[:shared]
            child.num_cached = shared * blocks.block_size
            child.num_prompt_hit = seq.num_prompt_hit
            scheduler.add_running(child)
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
            self._finish(seq)
        text = seq.detokenizer.delta(seq.finished) if seq.detokenizer is not None else ""
        logprobs = None if result.logprobs is None else [result.logprobs]
        return CompletionOutput(seq.index, text, [token], logprobs, seq.finish_reason)

    def _finish(self, seq: Sequence) -> None:
        if seq.session_id is not None and seq.finish_reason != "abort":
            self.sessions.hold(seq.session_id, seq.rank, seq.block_hashes)
        self.schedulers[seq.rank].finish(seq)
        if seq.params.seed is not None:
            self.released[seq.rank].append(seq.seq_id)  # its generator, on the rank's sampler

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        """Runs a whole batch to completion; one merged output per prompt, in input order."""
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        merged: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                merged[out.request_id] = merged[out.request_id].merge(out) if out.request_id in merged else out
        return [merged[i] for i in ids]


def sample_row(seq: Sequence) -> SampleRow:
    """What the sampler needs of a sequence; its token history only when a penalty reads it."""
    history = (seq.prompt_ids, seq.output_ids) if seq.params.has_penalties else ((), ())
    seed = None if seq.params.seed is None else seq.params.seed + seq.index
    return SampleRow(seq.params, seq.seq_id, seed, *history, seq.num_resumed)


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(model_dir: Path):
    """The checkpoint's own tokenizer and chat template, from local files only; None if it ships none. A broken one
    is a CheckpointError naming its files."""
    files = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    if not files:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; tokenizers' own are plain Exception
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer from {', '.join(files)} "
                              f"({type(e).__name__}: {e})") from None
