"""Frontend: what both front doors (HTTP and gRPC) do around the engine. Prompts from text, chat templates and FIM;
sessions; the context limit; submission; and, after a session's turn, its history.

Refusals are RequestErrors carrying an HTTP status; the gRPC door maps them to status codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

from router.async_engine import EngineBusy, EngineError
from router.migrating_stream import MigratingStream
from router.request_error import RequestError
from router.request_output import RequestOutput
from router.resumed_sample import ResumedSample
from router.session_store import Session, SessionError, SessionStore
from workers.sampling_params import SamplingParams

FIM_TOKENS = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")  # DeepSeek-Coder's, V1 and V2


class Submitted(NamedTuple):
    outputs: list[AsyncIterator[RequestOutput]]  # one stream per prompt
    replica: str | None  # the engine replica that took them (Ray Serve), for the X-Moe-Serve-Replica header


class Frontend:
    def __init__(self, engine, model_name: str, sessions: SessionStore,
                 observe: Callable[[AsyncIterator[RequestOutput]], AsyncIterator[RequestOutput]] = lambda s: s):
        """engine: AsyncEngine or EngineHandle (submit, stats, end_session, tokenizer, model_config,
        max_model_len). observe wraps each output stream (metrics)."""
        self.engine = engine
        self.model_name = model_name
        self.sessions = sessions
        self.observe = observe
        self.tokenizer = engine.tokenizer
        self.max_len = engine.max_model_len
        self.eos_id = None if self.tokenizer is None else self.tokenizer.eos_token_id

    # --- prompts ---

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_name:
            raise RequestError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                               "not_found_error", "model")

    def need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise RequestError(400, "this model ships no tokenizer: give token ids as the prompt")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.need_tokenizer()
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def fim_encoder(self, suffix: str) -> Callable[[str], list[int]]:
        """Fill-in-the-middle: the prompt is the code before the hole, `suffix` the code after it, in the model's
        own FIM tokens (DeepSeek-Coder: <｜fim▁begin｜>before<｜fim▁hole｜>after<｜fim▁end｜>)."""
        self.need_tokenizer()
        vocab = self.tokenizer.get_vocab()
        if any(t not in vocab for t in FIM_TOKENS):
            raise RequestError(400, "this model has no fill-in-the-middle tokens, so 'suffix' cannot be used",
                               param="suffix")
        begin, hole, end = FIM_TOKENS
        return lambda prefix: self.tokenizer.encode(f"{begin}{prefix}{hole}{suffix}{end}")

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        self.need_tokenizer()
        if not messages:
            raise RequestError(400, "messages is empty: send at least one message", param="messages")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def chat_ids(self, text: str) -> list[int]:
        return self.encode(text, add_special_tokens=False)  # the template writes the BOS itself

    def chat_prompt(self, messages: list[dict], session: Session | None) -> tuple[list[int], str]:
        """A chat's token ids (a session's own tokens for the part it has seen) and its rendered text."""
        text = self.chat_text(messages)
        ids = self.chat_ids(text) if session is None else session.prompt_for(text, self.chat_ids, self.chat_ids)
        return ids, text

    def session_prompt(self, session: Session, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return session.prompt_for(prompt, lambda rest: self.encode(rest, False), self.encode)
        return list(prompt)

    def max_tokens(self, prompts: list[list[int]], requested: int | None, session: Session | None = None) -> int:
        """requested, or all the room left, within the context; a RequestError past it (never a truncation)."""
        longest = max(len(p) for p in prompts)
        if longest >= self.max_len:
            held = f"session {session.session_id} has grown to {longest} tokens with this turn; " if session else \
                f"the prompt has {longest} tokens; "
            fix = "start a new session" if session else f"send at most {self.max_len - 1} prompt tokens"
            raise RequestError(400, f"{held}this model's context is {self.max_len} tokens: {fix}", param="prompt")
        room = self.max_len - longest
        if requested is None:
            return room
        if requested > room:
            raise RequestError(400, f"max_tokens is {requested}, but the prompt ({longest} tokens) leaves room for "
                                    f"{room} in this model's {self.max_len}-token context", param="max_tokens")
        return requested

    # --- the engine ---

    async def submit(self, prompts: list[list[int]], params: SamplingParams, rid: str,
                     session: Session | None = None) -> Submitted:
        """The engine takes every prompt, or none (then a RequestError says why). A session is busy from here
        until end_turn()."""
        taken, replica = [], None
        if session is not None:
            session.busy = True
        try:
            for i, prompt in enumerate(prompts):
                submit = self._submitter(prompt, params, f"{rid}-{i}", None if session is None else session.session_id)
                stream = await MigratingStream.open(submit, params)
                replica = stream.replica or replica
                taken.append(self.observe(stream))
        except BaseException as e:
            self.end_turn(session)
            for s in taken:
                await s.aclose()
            if isinstance(e, EngineBusy):
                raise RequestError(429, str(e), "rate_limit_error") from None
            if isinstance(e, ValueError):
                raise RequestError(400, str(e)) from None
            if isinstance(e, EngineError):  # no engine could take it
                raise RequestError(503, str(e), "service_unavailable") from None
            raise
        return Submitted(taken, replica)

    def _submitter(self, prompt: list[int], params: SamplingParams, request_id: str, session_id: str | None):
        """The request's submission: its first try (attempt 0), or a later one after its engine was lost (then with
        its progress), each under an id of its own."""
        async def submit(resumed: tuple[ResumedSample, ...], attempt: int) -> AsyncIterator[RequestOutput]:
            rid = request_id if attempt == 0 else f"{request_id}.{attempt}"
            return await self.engine.submit(prompt, params, rid, session_id, resumed)
        return submit

    # --- sessions ---

    def session(self, session_id: str | None, api_key: str | None) -> Session | None:
        """The caller's session, free for a turn; None without an id."""
        if not session_id:
            return None
        try:
            session = self.sessions.get(session_id, api_key)
        except SessionError as e:
            raise session_error(e) from None
        if session.busy:
            raise RequestError(409, f"session {session_id} is already running a turn; wait for it to finish")
        return session

    async def end_session(self, session_id: str, api_key: str | None) -> None:
        try:
            session = self.sessions.delete(session_id, api_key)
        except SessionError as e:
            raise session_error(e) from None
        await self.engine.end_session(session.session_id)

    @staticmethod
    def end_turn(session: Session | None) -> None:
        if session is not None:
            session.busy = False

    def exact(self, out: RequestOutput, params: SamplingParams) -> bool:
        """Whether the output's tokens match its text (it was not cut at a stop string)."""
        c = out.outputs[0]
        last = c.token_ids[-1] if c.token_ids else None
        return c.finish_reason == "length" or last == self.eos_id or last in params.stop_token_ids

    def record_completion(self, session: Session | None, text: str | None, prompt: list[int], out: RequestOutput,
                          params: SamplingParams) -> None:
        if session is None:
            return
        c = out.outputs[0]
        if text is None or not self.exact(out, params):
            session.record("", prompt)  # nothing to match text against next time; the prefix cache still helps
        else:
            session.record(text + c.text, prompt + c.token_ids)

    def record_chat(self, session: Session | None, messages: list[dict], text: str, prompt: list[int],
                    out: RequestOutput, params: SamplingParams) -> None:
        if session is None:
            return
        c = out.outputs[0]
        if not self.exact(out, params):
            session.record(text, prompt)
            return
        ids = prompt + c.token_ids
        if self.eos_id is not None and ids[-1] != self.eos_id:
            ids.append(self.eos_id)  # the template closes an assistant turn with EOS
        session.record(self.chat_text(messages + [{"role": "assistant", "content": c.text}], False), ids)

    # --- output ---

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def echo_text(self, prompt: list[int], text: str | None, params: SamplingParams) -> str:
        """The prompt as given, or, for token ids, their text."""
        if text is not None:
            return text
        self.need_tokenizer()
        return self.tokenizer.decode(prompt, skip_special_tokens=params.skip_special_tokens)


def session_error(e: SessionError) -> RequestError:
    if e.expired:
        return RequestError(410, str(e), "session_expired")
    return RequestError(404, str(e), "not_found_error")
