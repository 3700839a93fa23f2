"""Request and response bodies of the OpenAI-compatible API (plus vLLM's sampling extras).

Requests fail closed: unknown fields, wrong JSON types (no "1" for 1, no true for 1) and out-of-range
values are rejected, because a client whose constraint is silently dropped gets wrong output with a 200.
`null` means "not given", as in OpenAI's API. Cross-field rules raise `InvalidParam` so the error
names the parameter to fix.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_LOGPROBS = 20  # vLLM's default max_logprobs and OpenAI's top_logprobs bound
MAX_N = 16
MAX_PROMPTS = 32  # prompts in one batched completions request
MAX_STOP = 16
MAX_SEED = 2**63 - 1


class InvalidParam(ValueError):
    """A request value that is well-typed but not acceptable; `param` is the request field to fix."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Open(BaseModel):
    """Responses: serialised as-is; extra fields never arrive here."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    # vLLM extras
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP:
            raise InvalidParam("stop", f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise InvalidParam("stop", "stop sequences must be non-empty strings")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids and min(ids) < 0:
            raise InvalidParam("stop_token_ids", f"token ids must be >= 0, got {min(ids)}")
        return ids

    @model_validator(mode="after")
    def _cross_field(self):
        if self.stream_options is not None and not self.stream:
            raise InvalidParam("stream_options", "stream_options is only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value, handler):
        # One clear message instead of pydantic's four union-branch errors.
        try:
            prompt = handler(value)
        except ValidationError:
            raise InvalidParam(
                "prompt",
                "prompt must be a string, a list of strings, a list of token ids (integers >= 0) "
                "or a list of token-id lists",
            ) from None
        if isinstance(prompt, list):
            if not prompt:
                raise InvalidParam("prompt", "prompt must not be an empty list")
            if isinstance(prompt[0], (list, str)) and len(prompt) > MAX_PROMPTS:
                raise InvalidParam("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
            flat = [t for p in prompt for t in p] if isinstance(prompt[0], list) else prompt
            if any(isinstance(t, int) and t < 0 for t in flat):
                raise InvalidParam("prompt", "token ids must be >= 0")
        return prompt

    @model_validator(mode="after")
    def _echo(self):
        if self.echo and self.logprobs is not None:
            # Prompt logprobs are not computed by the engine; echo + logprobs would need them.
            raise InvalidParam("echo", "echo together with logprobs is not supported (no prompt logprobs)")
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParam(
                "min_tokens", f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})"
            )
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=256)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool | None = None

    @model_validator(mode="after")
    def _chat_cross_field(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParam("top_logprobs", "top_logprobs requires logprobs to be true")
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise InvalidParam(
                "max_completion_tokens",
                f"max_completion_tokens ({self.max_completion_tokens}) and the deprecated max_tokens "
                f"({self.max_tokens}) disagree; send only max_completion_tokens",
            )
        limit = self.max_completion_tokens or self.max_tokens
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            raise InvalidParam(
                "min_tokens", f"min_tokens ({self.min_tokens}) exceeds max_completion_tokens ({limit})"
            )
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


def request_field_names() -> frozenset[str]:
    """Every field name of every request model: what an error's `param` path may contain."""
    models = (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions,
              TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest)  # fmt: skip
    return frozenset(name for m in models for name in m.model_fields)


# ---- responses ---------------------------------------------------------------------------------


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Open):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM extra: the stop string or token id that matched


class CompletionResponse(_Open):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Open):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Open):
    content: list[TokenLogprob] | None = None


class AssistantMessage(_Open):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Open):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler):
        # OpenAI's deltas carry only the keys that changed: {"content": "..."} after the first chunk.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Open):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Open):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Open):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qserve"
    root: str
    max_model_len: int


class ModelList(_Open):
    object: Literal["list"] = "list"
    data: list[ModelCard]
