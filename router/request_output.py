"""RequestOutput: what a request gained in one engine step (or, merged, all it produced)."""

from __future__ import annotations

from typing import NamedTuple

from workers.sampler import TokenLogprobs


class CompletionOutput(NamedTuple):
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None  # one per token, when the request asked for logprobs
    finish_reason: str | None  # "stop", "length", "abort" once the sample is done


class RequestOutput(NamedTuple):
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # the samples that moved: their new text and tokens (deltas)
    finished: bool  # every sample is done
    num_cached_tokens: int  # prompt tokens served from the prefix cache

    def merge(self, later: "RequestOutput") -> "RequestOutput":
        """This output followed by a later one of the same request: deltas joined per sample."""
        by_index = {o.index: o for o in self.outputs}
        for o in later.outputs:
            old = by_index.get(o.index)
            if old is None:
                by_index[o.index] = o
                continue
            logprobs = None if old.logprobs is None else old.logprobs + (o.logprobs or [])
            by_index[o.index] = CompletionOutput(o.index, old.text + o.text, old.token_ids + o.token_ids, logprobs,
                                                 o.finish_reason)
        return later._replace(outputs=[by_index[i] for i in sorted(by_index)])
