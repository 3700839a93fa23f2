"""Engine outputs -> OpenAI response bodies (whole responses; streamed chunks reuse the pieces).

Choice indices follow OpenAI for batched prompts: prompt i's j-th sample is choice `i * n + j`.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from qserve.serve.api.prompts import PromptInput
from qserve.serve.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)

# JSON has no -inf; a token with probability 0 under the sampler (filtered by top-k/top-p) is
# reported with this floor, as vLLM does.
LOGPROB_FLOOR = -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ResponseMeta:
    """What every body of one response shares."""

    id: str
    created: int
    model: str

    @classmethod
    def make(cls, prefix: str, model: str) -> ResponseMeta:
        return cls(new_id(prefix), int(time.time()), model)


def _finite(x: float) -> float:
    return LOGPROB_FLOOR if math.isnan(x) else max(float(x), LOGPROB_FLOOR)


class LogprobFormatter:
    """Per-token logprob entries ({token_id: Logprob(logprob, rank, decoded_token)}) in OpenAI's shapes."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def token_str(self, token_id: int, entry=None) -> str:
        decoded = getattr(entry, "decoded_token", None)
        return decoded if decoded is not None else self.tokenizer.decode([token_id])

    def _top(self, step: dict, k: int) -> list[tuple[int, object]]:
        ranked = sorted(step.items(), key=lambda kv: -kv[1].logprob)
        return ranked[:k]

    def completion(self, token_ids: list[int], steps: list[dict], k: int, offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id, step in zip(token_ids, steps, strict=False):  # no steps: logprobs not kept
            entry = step.get(token_id)
            text = self.token_str(token_id, entry)
            out.tokens.append(text)
            out.token_logprobs.append(_finite(entry.logprob) if entry is not None else None)
            out.top_logprobs.append({self.token_str(t, e): _finite(e.logprob) for t, e in self._top(step, k)})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def chat(self, token_ids: list[int], steps: list[dict], k: int) -> list[TokenLogprob]:
        out = []
        for token_id, step in zip(token_ids, steps, strict=False):  # no steps: logprobs not kept
            entry = step.get(token_id)
            text = self.token_str(token_id, entry)
            top = [
                TopLogprob(
                    token=self.token_str(t, e),
                    logprob=_finite(e.logprob),
                    bytes=list(self.token_str(t, e).encode()),
                )
                for t, e in self._top(step, k)
            ]
            logprob = _finite(entry.logprob) if entry is not None else LOGPROB_FLOOR
            out.append(TokenLogprob(token=text, logprob=logprob, bytes=list(text.encode()), top_logprobs=top))
        return out


def usage(prompts: list[PromptInput], finals: list) -> Usage:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for f in finals if f is not None for c in f.outputs)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def completion_response(
    meta: ResponseMeta,
    prompts: list[PromptInput],
    finals: list,
    n: int,
    echo: bool,
    logprobs: int | None,
    fmt: LogprobFormatter,
) -> CompletionResponse:
    choices = []
    for i, (prompt, final) in enumerate(zip(prompts, finals, strict=True)):
        prefix = prompt.text if echo else ""
        for c in sorted(final.outputs, key=lambda c: c.index):
            lp = (
                None
                if logprobs is None
                else fmt.completion(c.token_ids, c.logprobs or [], logprobs, len(prefix))
            )
            choices.append(
                CompletionChoice(
                    index=i * n + c.index,
                    text=prefix + c.text,
                    logprobs=lp,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
    return CompletionResponse(
        id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage(prompts, finals)
    )


def chat_response(
    meta: ResponseMeta,
    prompt: PromptInput,
    final,
    top_logprobs: int | None,
    fmt: LogprobFormatter,
    tools=None,
) -> ChatCompletionResponse:
    """`tools`: the request's ToolPlan (serve/api/tools.py) when tool calls are parsed from the output."""
    choices = []
    for c in sorted(final.outputs, key=lambda c: c.index):
        lp = None
        if top_logprobs is not None:
            lp = ChatLogprobs(content=fmt.chat(c.token_ids, c.logprobs or [], top_logprobs))
        message, finish_reason = AssistantMessage(content=c.text), c.finish_reason
        if tools is not None:
            content, calls, finish_reason = tools.result(c.text, c.finish_reason)
            message = AssistantMessage(content=content, tool_calls=calls or None)
        choices.append(
            ChatChoice(
                index=c.index,
                message=message,
                logprobs=lp,
                finish_reason=finish_reason,
                stop_reason=c.stop_reason,
            )
        )
    return ChatCompletionResponse(
        id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage([prompt], [final])
    )
