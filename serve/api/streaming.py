"""Server-sent events for `stream: true`: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`.

Each chunk carries what is new since the previous one for a single choice: the text delta of the
cumulative engine output, and the logprobs of the new tokens. A chunk is sent whenever a choice gets
new tokens, even if their text is held back (an incomplete UTF-8 character), so clients that time
chunks (vLLM's benchmark) see one per token. With `stream_options.include_usage` a last chunk has
empty `choices` and the usage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel

from qserve.errors import QserveError
from qserve.serve.api.errors import APIError
from qserve.serve.api.generation import ClientDisconnected, Generation, engine_failure
from qserve.serve.api.prompts import PromptInput
from qserve.serve.api.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatLogprobs,
    CompletionChoice,
    CompletionResponse,
    Delta,
)
from qserve.serve.api.responses import LogprobFormatter, ResponseMeta, usage
from qserve.serve.api.tools import ToolStreamer

log = logging.getLogger("qserve.serve.api")

DONE = b"data: [DONE]\n\n"


def sse(body: BaseModel | dict) -> bytes:
    payload = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    return b"data: " + payload.encode() + b"\n\n"


@dataclass
class _Cursor:
    """How much of one choice's cumulative output has been sent."""

    chars: int = 0
    tokens: int = 0
    text_offset: int = 0
    finished: bool = False


def _new_part(c, cur: _Cursor) -> tuple[str, list[int], list] | None:
    """(text delta, new token ids, their logprob steps), or None when there is nothing to send."""
    new_ids = list(c.token_ids[cur.tokens :])
    text = c.text[cur.chars :] if len(c.text) > cur.chars else ""
    finishing = c.finish_reason is not None and not cur.finished
    if not new_ids and not text and not finishing:
        return None
    steps = list((c.logprobs or [])[cur.tokens :])
    cur.tokens = len(c.token_ids)
    cur.chars = max(cur.chars, len(c.text))
    cur.finished = c.finish_reason is not None
    return text, new_ids, steps


async def _guarded(gen: Generation, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Ends every stream with [DONE], reports an engine failure in-band, and always closes `gen`."""
    try:
        async for chunk in chunks:
            yield chunk
    except ClientDisconnected:
        return  # nobody is listening; gen.close() already aborted the engine requests
    except QserveError as exc:  # the engine died (or is closing); its cause is logged once, by the engine
        yield sse(engine_failure(gen.engine, exc).body())
    except Exception:
        # Headers are sent, so the status cannot change: tell the client in the stream, as vLLM does.
        log.exception("engine failure while streaming")
        yield sse(
            APIError(
                500, "The engine failed while generating; see the server log.", code="engine_error"
            ).body()
        )
    finally:
        await gen.close()
    yield DONE


def completion_stream(
    gen: Generation,
    meta: ResponseMeta,
    prompts: list[PromptInput],
    n: int,
    echo: bool,
    logprobs: int | None,
    include_usage: bool,
    fmt: LogprobFormatter,
) -> AsyncIterator[bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        cursors: dict[int, _Cursor] = {}
        finals: list = [None] * len(prompts)
        async for event in gen.events():
            i, out = event.prompt_index, event.output
            finals[i] = out
            for c in out.outputs:
                index = i * n + c.index
                first = index not in cursors
                cur = cursors.setdefault(index, _Cursor(text_offset=len(prompts[i].text) if echo else 0))
                part = _new_part(c, cur)
                if part is None:
                    continue
                text, new_ids, steps = part
                if echo and first:
                    text = prompts[i].text + text
                lp = None
                if logprobs is not None:
                    lp = fmt.completion(new_ids, steps, logprobs, cur.text_offset)
                    cur.text_offset += sum(len(t) for t in lp.tokens)
                choice = CompletionChoice(
                    index=index,
                    text=text,
                    logprobs=lp,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                yield sse(
                    CompletionResponse(id=meta.id, created=meta.created, model=meta.model, choices=[choice])
                )
        if include_usage:
            body = CompletionResponse(
                id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage(prompts, finals)
            )
            yield sse(body)

    return _guarded(gen, chunks())


def _tool_chunks(streamer: ToolStreamer, c, lp: ChatLogprobs | None) -> list[ChatChunkChoice]:
    """One step of a tool-calling choice: its deltas, the logprobs on the first, the finish on the last."""
    deltas, reason = streamer.step(c.text, c.finish_reason)
    if not deltas and (lp is not None or reason is not None):
        deltas = [Delta()]
    last = len(deltas) - 1
    return [
        ChatChunkChoice(index=c.index, delta=d, logprobs=lp if j == 0 else None,
                        finish_reason=reason if j == last else None,
                        stop_reason=c.stop_reason if j == last else None)
        for j, d in enumerate(deltas)
    ]  # fmt: skip


def chat_stream(
    gen: Generation,
    meta: ResponseMeta,
    prompt: PromptInput,
    top_logprobs: int | None,
    include_usage: bool,
    fmt: LogprobFormatter,
    tools=None,
) -> AsyncIterator[bytes]:
    """`tools`: the request's ToolPlan (serve/api/tools.py) when tool calls are parsed from the output."""

    def chunk(choice: ChatChunkChoice) -> bytes:
        return sse(ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=[choice]))

    async def chunks() -> AsyncIterator[bytes]:
        cursors: dict[int, _Cursor] = {}
        streamers: dict[int, ToolStreamer] = {}
        final = None
        async for event in gen.events():
            final = event.output
            for c in final.outputs:
                if c.index not in cursors:
                    cursors[c.index] = _Cursor()
                    # OpenAI opens every choice with the role and an empty content.
                    yield chunk(ChatChunkChoice(index=c.index, delta=Delta(role="assistant", content="")))
                part = _new_part(c, cursors[c.index])
                if part is None:
                    continue
                text, new_ids, steps = part
                lp = None
                if top_logprobs is not None:
                    lp = ChatLogprobs(content=fmt.chat(new_ids, steps, top_logprobs))
                if tools is not None:
                    streamer = streamers.setdefault(c.index, ToolStreamer(tools))
                    for piece in _tool_chunks(streamer, c, lp):
                        yield chunk(piece)
                    continue
                delta = Delta(content=text) if text or c.finish_reason is None else Delta()
                yield chunk(
                    ChatChunkChoice(
                        index=c.index,
                        delta=delta,
                        logprobs=lp,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        if include_usage:
            body = ChatCompletionChunk(
                id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage([prompt], [final])
            )
            yield sse(body)

    return _guarded(gen, chunks())
