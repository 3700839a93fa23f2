"""AsyncLLMEngine: the LLMEngine stepped by a background thread, one asyncio queue per request.

Only the engine thread touches the engine. The event loop talks to it through a FIFO inbox of
commands (add, abort), applied between steps, so an abort can never overtake the add it cancels
and a request is admitted within one step however busy the engine is (a shared lock would let the
stepping thread starve admissions). Outputs and admission results cross back with
`loop.call_soon_threadsafe`.

When the engine loop dies (a step raises), the thread logs the cause once and fails every request it
knows of, running or still in the inbox, with `EngineDeadError`; a request that registers after the
failure sees it through `is_healthy` (checked again after registering, so none can slip between).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from qserve.errors import QserveError, ResourceError
from qserve.serve.engine import EngineArgs, LLMEngine
from qserve.serve.metrics import EngineStats
from qserve.serve.outputs import SchedulerStats
from qserve.serve.request_output import RequestOutput
from qserve.serve.sampling_params import SamplingParams
from qserve.serve.sequence import QueueFullError

log = logging.getLogger("qserve.serve.engine")

__all__ = ["AsyncLLMEngine", "EngineArgs", "EngineClosedError", "EngineDeadError", "QueueFullError"]


class EngineDeadError(QserveError):
    """The engine loop stopped on an error; no request can be served (the server reports unhealthy)."""


class EngineClosedError(ResourceError):
    """The engine is shutting down and accepts no new requests."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    admitted: asyncio.Future  # resolved once the engine took (or refused) the request


class AsyncLLMEngine:
    def __init__(self, args: EngineArgs | None = None, **kwargs) -> None:
        self.args = args if args is not None else EngineArgs(**kwargs)
        self.engine = LLMEngine(self.args)
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.args.model
        self.max_model_len = self.engine.max_model_len
        self.quantization = self.engine.quantization
        self.kv_cache_tokens = self.engine.kv_cache_tokens
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._sched_snapshot = self._sched_state()
        self._idle = True  # no request in the engine (as of the engine thread's last iteration)
        self._error: BaseException | None = None
        self._closing = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="qserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, args: EngineArgs) -> AsyncLLMEngine:
        return cls(args)

    @property
    def is_healthy(self) -> bool:
        return self._error is None and self._thread.is_alive()

    def _dead_error(self) -> EngineDeadError:
        dead = EngineDeadError(f"the engine loop has stopped: {self._error!r}; restart the server")
        dead.__cause__ = self._error
        return dead

    def stats(self) -> EngineStats:
        """Snapshot as of the engine thread's last iteration; never waits for a running step."""
        return self.engine.metrics.snapshot(*self._sched_snapshot)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs as tokens arrive; the last has finished=True. Raises QueueFullError
        when the waiting queue is full. Closing or cancelling the iterator (a client disconnect)
        aborts the request and frees its KV blocks."""
        if self._error is not None:
            raise self._dead_error()
        if self._closing or not self._thread.is_alive():
            raise EngineClosedError("the engine is shutting down and accepts no new requests")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in flight; use a unique id")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), loop.create_future())
        self._streams[request_id] = stream
        finished = False
        try:
            # Registered first, checked second: the engine thread records its error before it fails the
            # registered streams, so a death either finds this stream or is seen here.
            if self._error is not None:
                raise self._dead_error()
            self._send(("add", request_id, prompt, params, stream.admitted))
            await stream.admitted  # raises the engine's QueueFullError / ValueError / EngineDeadError
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream, if still read, ends with a finish_reason='abort' output."""
        self._send(("abort", request_id))

    async def shutdown(self, drain: bool = True) -> None:
        """Stop accepting requests; with `drain` let in-flight ones finish, else abort them; then stop."""
        self._closing = True
        if not drain:
            self._send(("abort_all",))
        while self.is_healthy and not (self._idle and self._inbox.empty()):
            await asyncio.sleep(0.02)
        self._stop = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)

    # ---- engine thread side -------------------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _sched_state(self) -> tuple[SchedulerStats, int, int]:
        s = self.engine.scheduler
        return s.stats(), s.num_running, s.num_waiting

    def _run(self) -> None:
        try:
            while not self._stop:
                self._wake.wait()
                self._wake.clear()  # before draining: a command sent from now on wakes us again
                outputs = self._apply_commands()
                if self.engine.has_unfinished():
                    outputs += self.engine.step()
                    self._wake.set()  # keep stepping
                self._sched_snapshot = self._sched_state()
                self._idle = not self.engine.has_unfinished()
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as exc:  # every consumer must learn that the engine died
            self._error = exc
            # The one place the cause is logged; each request then gets a short EngineDeadError.
            log.error("the engine loop failed; failing every open request", exc_info=exc)
            for stream in list(self._streams.values()):
                # Running requests read the queue; those still in the inbox wait on `admitted`.
                with contextlib.suppress(RuntimeError):  # that consumer's event loop is closed
                    stream.loop.call_soon_threadsafe(_fail, stream, self._dead_error())

    def _apply_commands(self) -> list[RequestOutput]:
        outputs = []
        while not self._inbox.empty():
            command = self._inbox.get()
            if command[0] == "add":
                _, request_id, prompt, params, admitted = command
                try:
                    self.engine.add_request(request_id, prompt, params)
                    error = None
                except (QserveError, ValueError) as exc:  # refused: the caller gets the reason
                    error = exc
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.loop.call_soon_threadsafe(_resolve, admitted, error)
            else:
                ids = self.engine.request_ids() if command[0] == "abort_all" else [command[1]]
                outputs += [out for out in map(self.engine.abort, ids) if out is not None]
        return outputs

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody will read this request
            self._send(("abort", request_id))


def _fail(stream: _Stream, error: BaseException) -> None:
    if not stream.admitted.done():
        stream.admitted.set_exception(error)
        stream.admitted.exception()  # marks it retrieved: a consumer that left must not log it again
    stream.queue.put_nowait(error)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile; its abort is already queued behind the add
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
