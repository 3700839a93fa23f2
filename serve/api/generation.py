"""The engine requests behind one HTTP request: one per prompt, merged, abortable as a unit.

Each engine stream is drained by its own task into one queue, next to a task that watches the ASGI
`receive` channel for `http.disconnect`. The route reads one event at a time from the queue, so a client
that leaves (mid-request or mid-stream) is noticed even while no token is due, and `close()` then
cancels the drains, which aborts the engine requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive

from qserve.errors import QserveError
from qserve.serve.api.errors import APIError
from qserve.serve.api.metrics import RequestTrack


class ClientDisconnected(Exception):
    """The HTTP client went away; its engine requests have been aborted."""


def engine_dead() -> APIError:
    return APIError(
        503,
        "The engine has stopped after an internal error (the server log has the cause); restart the server.",
        code="engine_dead",
    )


def engine_failure(engine, exc: QserveError) -> APIError:
    """The 503 for an engine error under a request: a dead engine (its thread logged the cause, once,
    so nothing is logged here) or one shutting down."""
    if not engine.is_healthy:
        return engine_dead()
    return APIError(503, f"The engine cannot take requests: {exc}", code="engine_unavailable")


@dataclass(frozen=True)
class Event:
    prompt_index: int
    output: Any  # RequestOutput (cumulative)


_OUTPUT = object()  # queue notices: a new output is in `_latest`, the stream ended, the client left
_END = object()
_GONE = object()


class Generation:
    """Runs `engine.generate` for every prompt of one HTTP request; see the module docstring."""

    def __init__(
        self,
        engine,
        prompts: list[list[int]],
        params,
        request_id: str,
        receive: Receive,
        tracks: list[RequestTrack],
    ) -> None:
        self._engine = engine
        self._params = params
        self._n = params.n
        self.request_ids = (
            [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        )
        self._prompts = prompts
        self._receive = receive
        self._tracks = tracks
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._finished = [False] * len(prompts)
        self._primed: list[Event] = []
        self._latest: list[Any] = [None] * len(prompts)
        self._pending = [False] * len(prompts)
        self._closed = False

    @property
    def engine(self):
        return self._engine

    async def _drain(self, index: int) -> None:
        stream = self._engine.generate(self._prompts[index], self._params, self.request_ids[index])
        try:
            async with contextlib.aclosing(stream):
                async for output in stream:
                    # Outputs are cumulative: keep only the newest, so a slow reader costs one output per
                    # prompt, not a backlog; the queue carries at most one pending notice per prompt.
                    self._latest[index] = output
                    if not self._pending[index]:
                        self._pending[index] = True
                        self._queue.put_nowait((index, _OUTPUT))
        except Exception as exc:  # handed to the reader, which raises it in the route
            self._queue.put_nowait((index, exc))
        else:
            self._queue.put_nowait((index, _END))

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass  # a body chunk after the replayed body; only the disconnect matters here
        await self._queue.put((-1, _GONE))

    async def _next(self) -> tuple[int, Any]:
        index, item = await self._queue.get()
        if item is _OUTPUT:
            self._pending[index] = False
            item = self._latest[index]
        elif item is _GONE:
            await self.close()
            raise ClientDisconnected
        elif isinstance(item, BaseException):
            self._finished[index] = True  # refused or failed in the engine: nothing left to abort
            self._tracks[index].discard()
            await self.close()
            raise item
        if item is not _END:
            self._tracks[index].observe(item)
            if item.finished:
                self._finished[index] = True
        return index, item

    async def start(self) -> None:
        """Submits every prompt and waits for each one's first output.

        Waiting here means an engine refusal (queue full, bad prompt) becomes an HTTP status before a
        single byte of a streamed response has been sent.
        """
        self._tasks = [asyncio.create_task(self._drain(i)) for i in range(len(self._prompts))]
        self._tasks.append(asyncio.create_task(self._watch()))
        started = [False] * len(self._prompts)
        while not all(started):
            index, item = await self._next()
            started[index] = True
            if item is not _END:
                self._primed.append(Event(index, item))

    async def events(self) -> AsyncIterator[Event]:
        """Every output in arrival order, the primed ones first; ends when all prompts finished."""
        for event in self._primed:
            yield event
        self._primed = []
        ended = sum(1 for f in self._finished if f)
        while ended < len(self._prompts):
            index, item = await self._next()
            if item is _END:
                if not self._finished[index]:
                    self._finished[index] = True  # stream ended without a finished output
                    ended += 1
                continue
            yield Event(index, item)
            if item.finished:
                ended += 1
        await self.close()

    async def collect(self) -> list[Any]:
        """The final output of every prompt (non-streaming responses)."""
        final: list[Any] = [None] * len(self._prompts)
        async for event in self.events():
            final[event.prompt_index] = event.output
        return final

    async def close(self) -> None:
        """Idempotent: stop the drains (aborting unfinished engine requests) and the watcher."""
        if self._closed:
            return
        self._closed = True
        # Shielded: a route cancelled by the server (client gone) sits in an anyio scope that re-cancels
        # every await; the aborts must still all happen.
        await asyncio.shield(self._teardown())

    async def _teardown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for index, done in enumerate(self._finished):
            if not done:
                # Cancelling the consumer already aborts by contract; the explicit abort also covers an
                # engine request that was queued but had not yielded yet.
                await self._engine.abort(self.request_ids[index])
                self._tracks[index].abort(self._n)
