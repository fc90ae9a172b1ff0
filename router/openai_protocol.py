"""The OpenAI-compatible request bodies (pydantic, at the edge only), and their translation to SamplingParams.

Field names and defaults follow OpenAI's API, with vLLM's extensions (top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos, ...). Unknown fields are ignored, as OpenAI clients send some we do not use.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from workers.sampling_params import SamplingParams


def valid_text(text: str) -> str:
    """JSON may carry lone UTF-16 surrogates ("\\ud800"), which are not text; refused here, as a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (\\ud800-\\udfff), which is not valid Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(valid_text)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False  # vLLM's extension: the prompt's and the output's token ids in the response

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Raises ValueError (a 400) for values out of range."""
        given = {k: v for k, v in {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty}.items() if v is not None}
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(n=self.n, max_tokens=max_tokens, seed=self.seed, stop=tuple(stop),
                              stop_token_ids=tuple(self.stop_token_ids or ()), logprobs=logprobs,
                              include_stop_str_in_output=self.include_stop_str_in_output,
                              ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens, **given)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    tokens: list[int]


class SessionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ttl_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)  # idle time before it expires
