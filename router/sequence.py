"""Sequence: one sample of a request — its tokens, cache blocks and progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.sampling_params import SamplingParams


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    rank: int = 0  # the attention rank that holds its cache
    session_id: str | None = None  # its history is pinned in the cache for the session's next turn
    output_ids: list[int] = field(default_factory=list)
    num_resumed: int = 0  # output tokens generated on another engine before this one took the sample over
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks computed so far
    num_cached: int = 0  # tokens whose KV is in the cache
    num_prompt_hit: int = 0  # prompt tokens the prefix cache served at admission
    finish_reason: str | None = None
    logprobs: list[Any] = field(default_factory=list)  # TokenLogprobs per output token, when asked for
    detokenizer: Any = None  # IncrementalDetokenizer, when the engine has a tokenizer
    forks: list["Sequence"] = field(default_factory=list)  # the other n-1 samples, until the prompt is done

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_to_compute(self) -> int:
        return self.num_tokens - self.num_cached

    def token_slice(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n : stop - n]
        return self.prompt_ids[start:] + self.output_ids[: stop - n]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
