"""Request and response bodies of the OpenAI-compatible API (plus vLLM's sampling extras).

Requests fail closed: unknown fields, wrong JSON types (no "1" for 1, no true for 1) and out-of-range
values are rejected, because a client whose constraint is silently dropped gets wrong output with a 200.
`null` means "not given", as in OpenAI's API. Cross-field rules raise `InvalidParam` so the error
names the parameter to fix.
"""

from __future__ import annotations

from typing import Any, Literal

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


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`: OpenAI's named schema; `strict` is accepted, and the schema is
    always enforced (qserve constrains decoding whether or not strict is set)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise InvalidParam("response_format.json_schema", "type 'json_schema' needs a json_schema object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise InvalidParam(
                "response_format.json_schema", "json_schema is only allowed with type 'json_schema'"
            )
        return self


class StructuredOutputsRequest(_Strict):
    """vLLM's `structured_outputs` extra: exactly one of json (a schema), json_object, regex, choice,
    grammar (xgrammar EBNF)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = Field(default=None, min_length=1)
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            names = [g.rstrip("_") for g in given]
            raise InvalidParam(
                "structured_outputs",
                f"give exactly one of json, json_object, regex, choice, grammar (got {names or 'none'})",
            )
        return self


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
    # Structured outputs (serve/structured.py): OpenAI's response_format, vLLM's structured_outputs.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None

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
        constrained = self.response_format is not None and self.response_format.type != "text"
        if constrained and self.structured_outputs is not None:
            raise InvalidParam(
                "structured_outputs", "send either response_format or structured_outputs, not both"
            )
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


class FunctionCall(_Strict):
    name: str = Field(min_length=1, max_length=64)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = Field(default=None, max_length=256)  # a tool turn: the call it answers

    @model_validator(mode="after")
    def _roles(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(
                f"a '{self.role}' message needs content (only an assistant message with tool_calls may omit it)"
            )
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the tool_call_id it answers")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool | None = None
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

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
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidParam("tools", f"function names must be unique, got {names}")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise InvalidParam("tool_choice", "tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise InvalidParam(
                "tool_choice",
                f"tool_choice names function '{self.tool_choice.function.name}', not in tools {names}",
            )
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and (self.structured_outputs is not None or
                       (self.response_format is not None and self.response_format.type != "text")):  # fmt: skip
            raise InvalidParam("tool_choice", "a forced tool call cannot be combined with response_format or "
                               "structured_outputs")  # fmt: skip

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
              TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest, ResponseFormat, JsonSchemaFormat,
              StructuredOutputsRequest, ToolCall, FunctionCall, ToolDefinition, FunctionDefinition,
              NamedToolChoice, NamedFunction)  # fmt: skip
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


class ToolCallOut(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Open):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_tools(self, handler):
        # OpenAI sends tool_calls only when there are some; content is null next to them.
        body = handler(self)
        if body.get("tool_calls") is None:
            body.pop("tool_calls", None)
        return body


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


class FunctionCallDelta(_Open):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCallDelta(_Open):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class Delta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

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
    capabilities: dict[str, Any] | None = None  # qserve extra: structured outputs and tool calling


class ModelList(_Open):
    object: Literal["list"] = "list"
    data: list[ModelCard]
