"""The engine core in a process of its own, and the API process's asyncio client for it.

`qserve serve` runs two processes, as vLLM v1 does. The **engine core** process owns the `LLMEngine`
(scheduler, model runner, KV cache) and runs nothing but its step loop: between two steps it takes every
command that has arrived (add, abort, end a sequence on a stop string), then runs one step and sends what
the step produced. The **API process** does everything a request's client side needs: HTTP parsing,
tokenization, chat templating, grammar checks, detokenization, stop strings, logprob decoding and SSE
framing. None of that takes the core's GIL, and the core never waits for any of it: sends on both sides
go to ZeroMQ's I/O thread and return at once.

Transport: ZeroMQ (pyzmq) PUSH/PULL sockets over IPC (Unix domain sockets in a fresh 0700 temporary
directory), one socket each way. Why ZeroMQ rather than a multiprocessing pipe: a pipe write blocks
once the kernel buffer is full, so a busy API process could stall the step loop (and a busy core the
event loop); ZeroMQ queues messages in its own C++ I/O thread, frames them, and lets one poll watch the
socket and the core's process sentinel together. Payloads are pickle protocol 5: both ends are this
program, the channel is private to the user, and the messages are the engine's own dataclasses
(`SamplingParams` with its nested structured-output spec, `CoreOutput`s with `TokenLogprobs`), which
msgpack would need a hand-written encoder for each of; no tensors cross, so no out-of-band buffers.

What crosses is small: the core sends token ids (`CoreOutput`: only the new tokens of each touched
sequence), never text, plus its scheduler and metrics state each iteration (so `/metrics` and the stats
line read the core's own numbers). The client applies the updates to a `RequestState` per request
(serve/output_processor.py) on its receiver thread, so the text streamed is what the in-process engine
would stream; a stop string it finds is sent back and ends the sequence before the core's next step.

Failure. The client's receiver thread polls the core's process sentinel with the socket: when the core
dies (a step raised, the process was killed), every open request fails at once with `EngineDeadError`
(the server's 503 path), `/health` turns 503 and the death callbacks run (`qserve serve` uses one to
stop the server, which then exits non-zero). The core is not restarted: its KV cache and requests are
gone, and a supervisor (Kubernetes, systemd) restarts the whole server more safely. A core whose parent
dies exits within a second. Ctrl-C and SIGTERM are left to the API process, which drains and then tells
the core to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import zmq

from qserve.errors import QserveError
from qserve.serve.async_engine import EngineClosedError, EngineDeadError
from qserve.serve.engine import EngineArgs
from qserve.serve.metrics import EngineMetrics, EngineStats, MetricsUpdate
from qserve.serve.output_processor import CoreOutput, RequestState
from qserve.serve.outputs import SchedulerStats
from qserve.serve.request_output import RequestOutput
from qserve.serve.sampling_params import SamplingParams
from qserve.serve.sequence import QueueFullError

log = logging.getLogger("qserve.serve.engine_core")

__all__ = ["EngineCoreClient", "run_engine_core"]

_PICKLE = 5
_PARENT_CHECK_S = 1.0  # an idle core checks this often that the API process is still there


def _dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=_PICKLE)


@dataclass(frozen=True)
class CoreInfo:
    """What the core tells the client once its engine is built."""

    pid: int
    model_dir: str
    max_model_len: int
    quantization: str | None
    kv_cache_tokens: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    resident_weight_bytes: int


@dataclass(frozen=True)
class CoreStats:
    """The core's state as of its last iteration; `steps` counts the steps it has run."""

    scheduler: SchedulerStats
    num_running: int
    num_waiting: int
    metrics: MetricsUpdate
    steps: int


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling unchanged in kind, else its nearest plain kind with its message (an
    exception whose __init__ takes other arguments cannot be rebuilt by pickle)."""
    try:
        pickle.loads(_dumps(exc))
        return exc
    except Exception:
        for kind in (QueueFullError, QserveError, ValueError):
            if isinstance(exc, kind):
                return kind(str(exc))
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# ---- the engine core process ---------------------------------------------------------------------------


def run_engine_core(
    args: EngineArgs, input_addr: str, output_addr: str, parent_pid: int, log_level: str,
    engine_hook: Callable | None = None,
) -> None:  # fmt: skip
    """The core process's entry point (multiprocessing spawn target). `engine_hook(engine)` runs once the
    engine is built, before it serves (tests use it to slow or break steps)."""
    # Ctrl-C reaches the whole process group: the API process decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s", datefmt="%m-%d %H:%M:%S"
    )
    ctx = zmq.Context(io_threads=1)
    inbox = ctx.socket(zmq.PULL)
    outbox = ctx.socket(zmq.PUSH)
    for sock in (inbox, outbox):
        sock.setsockopt(zmq.SNDHWM, 0)  # no high-water mark: the step loop never waits for the API
        sock.setsockopt(zmq.RCVHWM, 0)
    inbox.connect(input_addr)
    outbox.connect(output_addr)
    code = 1
    try:
        from qserve.serve.engine import LLMEngine

        _set_core_threads()

        try:
            engine = LLMEngine(args, detokenize=False)
            if engine_hook is not None:
                engine_hook(engine)
        except BaseException as exc:
            if not isinstance(exc, QserveError):
                log.exception("the engine core could not start")
            _post(outbox, ("failed", _portable(exc)))
            return
        engine.metrics.export()  # from here on the metrics keep the samples each report carries
        info = CoreInfo(
            os.getpid(), str(engine.model_dir), engine.max_model_len, engine.quantization, engine.kv_cache_tokens,
            engine.model_config.vocab_size, tuple(sorted(engine.eos_token_ids)), engine.resident_weight_bytes,
        )  # fmt: skip
        loop = _CoreLoop(engine, inbox, outbox, parent_pid)
        _post(outbox, ("ready", info, loop.stats()))
        try:
            loop.run()
            code = 0
        except BaseException as exc:  # the step loop died: say so, the client fails every request
            log.error("the engine core's step loop failed; every open request fails", exc_info=exc)
            _post(outbox, ("dead", f"{type(exc).__name__}: {exc}"))
    finally:
        outbox.close(linger=2000)  # let the last message out
        inbox.close(linger=0)
        ctx.term()
        if code:
            sys.exit(code)


def _set_core_threads() -> None:
    """On machines with more than 2 CPUs, run the core's torch ops on all CPUs but one (unless
    OMP_NUM_THREADS says otherwise); on 1-2 CPUs, on all of them.

    Every CPU op is an OpenMP parallel region ending in a barrier: when the API process takes a CPU to
    handle a step's outputs, a core using every CPU has one of its threads descheduled and the whole op
    waits for it. vLLM's CPU backend leaves one core to its API server and scheduler for that reason, and
    with many cores that costs little. With two it halves the core's compute, and the API's share of a
    CPU is small: measured on 2 CPUs (SmolLM2 bf16, 64 ShareGPT prompts x 64 tokens, `vllm bench serve`,
    2026-12-03), two core threads against one gave output tok/s 182-194 against 150-185 at 4 req/s,
    265 against 239 at 8 req/s, and TPOT p50 51 against 73 ms at 1 req/s. A machine whose CPUs are taken
    by other work still collapses with every thread busy: OMP_NUM_THREADS=1 is the remedy there."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = cpus - 1 if cpus > 2 else cpus
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)
        log.info("engine core: %d torch thread(s) of %d CPUs (one left to the API process; set "
                 "OMP_NUM_THREADS to choose)", threads, cpus)  # fmt: skip


def _post(outbox: zmq.Socket, message: tuple) -> bool:
    """Queue `message` for the API process without ever blocking; False when nobody is connected."""
    try:
        outbox.send(_dumps(message), zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False


class _CoreLoop:
    def __init__(self, engine, inbox: zmq.Socket, outbox: zmq.Socket, parent_pid: int) -> None:
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = parent_pid
        self.steps = 0

    def stats(self) -> CoreStats:
        s = self.engine.scheduler
        return CoreStats(s.stats(), s.num_running, s.num_waiting, self.engine.metrics.export(), self.steps)

    def _parent_gone(self) -> bool:
        if os.getppid() != self.parent_pid:
            log.warning("the API process has gone; the engine core exits")
            return True
        return False

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        engine = self.engine
        while True:
            busy = engine.has_unfinished()
            if not busy and not poller.poll(_PARENT_CHECK_S * 1000):
                if self._parent_gone():
                    return
                engine.check_health()  # a dead tensor-parallel worker ends the core even while idle
                continue
            admissions: list[tuple[str, BaseException | None, list[int] | None]] = []
            outputs: list[CoreOutput] = []
            commands = 0
            while True:
                try:
                    command = pickle.loads(self.inbox.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                commands += 1
                if command[0] == "shutdown":
                    _post(self.outbox, ("step", admissions, outputs, self.stats()))
                    return
                self._apply(command, admissions, outputs)
            if engine.has_unfinished():
                outputs += engine.step()
                self.steps += 1
            if (commands or busy) and not _post(self.outbox, ("step", admissions, outputs, self.stats())):
                log.warning("the API process is not reading; the engine core exits")
                return
            if self._parent_gone():
                return

    def _apply(self, command: tuple, admissions: list, outputs: list) -> None:
        engine, kind = self.engine, command[0]
        if kind == "add":
            _, request_id, prompt, params, arrival_time = command
            try:
                engine.add_request(request_id, prompt, params, arrival_time=arrival_time)
            except (QserveError, ValueError) as exc:  # refused: the caller gets the reason
                admissions.append((request_id, _portable(exc), None))
            else:
                ids = engine.prompt_token_ids(request_id) if isinstance(prompt, str) else None
                admissions.append((request_id, None, ids))
        elif kind == "abort":
            out = engine.abort(command[1])
            if out is not None:
                outputs.append(out)
        elif kind == "abort_all":
            outputs += [out for out in map(engine.abort, engine.request_ids()) if out is not None]
        elif kind == "stop":
            _, request_id, index, stop = command
            engine.stop_sequence(request_id, index, stop)
        else:
            raise ValueError(f"unknown engine core command {kind!r}")


# ---- the client, in the API process ---------------------------------------------------------------------


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    admitted: asyncio.Future  # resolved once the core took (or refused) the request
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float


class EngineCoreClient:
    """`AsyncLLMEngine`'s interface (generate / abort / stats / shutdown / is_healthy / tokenizer /
    max_model_len / model_name / quantization / kv_cache_tokens / structured) over an engine core
    process; see the module docstring. Blocks in the constructor until the core has loaded the model
    (raising its error if it could not)."""

    def __init__(
        self, args: EngineArgs | None = None, *, log_level: str = "info", engine_hook: Callable | None = None,
        **kwargs,
    ) -> None:  # fmt: skip
        from transformers import AutoTokenizer

        from qserve.hub import resolve_model
        from qserve.serve.structured import StructuredOutputCompiler

        self.args = args if args is not None else EngineArgs(**kwargs)
        self.model_name = self.args.model
        self._dir = tempfile.mkdtemp(prefix="qserve-core-")  # 0700: the sockets are this user's only
        self._ctx = zmq.Context(io_threads=1)
        self._input = self._ctx.socket(zmq.PUSH)
        self._output = self._ctx.socket(zmq.PULL)
        for sock in (self._input, self._output):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)  # no high-water mark: a send never waits for the core
            sock.setsockopt(zmq.RCVHWM, 0)
        input_addr, output_addr = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._input.bind(input_addr)
        self._output.bind(output_addr)
        self._send_lock = threading.Lock()  # the input socket is used by the event loop and the receiver
        # close() may run twice at once (a server's shutdown thread and its owner): the second waits for the
        # first, so that it returns with the core gone and its exit code set
        self._close_lock = threading.RLock()
        self._streams: dict[str, _Stream] = {}
        self._states: dict[str, RequestState] = {}  # receiver thread only
        self._error: str | None = None  # why the core died, once it has
        self._closing = False
        self._stopping = False
        self._death_callbacks: list[Callable[[], None]] = []
        self.exitcode: int | None = None
        spawn = multiprocessing.get_context("spawn")
        self._proc = spawn.Process(
            target=run_engine_core, name="qserve-engine-core", daemon=True,
            args=(self.args, input_addr, output_addr, os.getpid(), log_level, engine_hook),
        )  # fmt: skip
        self._proc.start()
        try:
            info, stats = self._wait_ready()
            model_dir = Path(info.model_dir) if info.model_dir else Path(resolve_model(self.args.model))
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            # A second instance for detokenizing on the receiver thread: a fast tokenizer must not be
            # used from two threads at once, and the API's tokenizer thread uses the first.
            self._detok_tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except BaseException:
            self._kill()
            raise
        self.core_pid = info.pid
        self.max_model_len = info.max_model_len
        self.quantization = info.quantization
        self.kv_cache_tokens = info.kv_cache_tokens
        # Grammars are compiled here first (a bad one is a 400 before the request reaches the core);
        # the core compiles its own copy from the spec, cached by key.
        self.structured = StructuredOutputCompiler(self.tokenizer, info.vocab_size, info.eos_token_ids)
        self._metrics = EngineMetrics()
        self._metrics.resident_weight_bytes = info.resident_weight_bytes
        self._core_stats = stats
        self._metrics.absorb(stats.metrics)
        self._thread = threading.Thread(target=self._receive_loop, name="qserve-core-client", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, args: EngineArgs) -> EngineCoreClient:
        return cls(args)

    # ---- the interface --------------------------------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self._error is None and not self._stopping

    @property
    def death(self) -> str | None:
        """Why the core died while serving (None while it lives or after a normal stop)."""
        return self._error

    @property
    def steps(self) -> int:
        """Steps the core has run, as of its last report."""
        return self._core_stats.steps

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError(f"{self._error or 'the engine core process has died'}; restart the server")

    def on_death(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (on the receiver thread) if the core dies while serving."""
        self._death_callbacks.append(callback)

    def stats(self) -> EngineStats:
        """The core's state as of its last report (sent every iteration it did anything)."""
        s = self._core_stats
        return self._metrics.snapshot(s.scheduler, s.num_running, s.num_waiting)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """As `AsyncLLMEngine.generate`: cumulative outputs, the last with finished=True; closing or
        cancelling the iterator aborts the request in the core."""
        if self._error is not None:
            raise self._dead_error()
        if self._closing or self._stopping:
            raise EngineClosedError("the engine is shutting down and accepts no new requests")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in flight; use a unique id")
        loop = asyncio.get_running_loop()
        arrival = time.time()
        stream = _Stream(loop, asyncio.Queue(), loop.create_future(), prompt, params, arrival)
        self._streams[request_id] = stream
        finished = False
        try:
            # Registered first, checked second: the receiver records a death before it fails the
            # registered streams, so a death either finds this stream or is seen here.
            if self._error is not None:
                raise self._dead_error()
            spec = params.structured_outputs
            if spec is not None and spec.compiled is not None:
                params = replace(params, structured_outputs=replace(spec, compiled=None))  # not picklable
            self._send(("add", request_id, prompt, params, arrival))
            await stream.admitted
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
        self._send(("abort", request_id))

    async def shutdown(self, drain: bool = True) -> None:
        """Stop accepting requests; with `drain` let open ones finish, else abort them; stop the core."""
        self._closing = True
        if not drain:
            self._send(("abort_all",))
        while self._error is None and self._streams:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the core (it finishes its current step) and release the sockets; idempotent."""
        with self._close_lock:
            self._close()

    def _close(self) -> None:
        if self._stopping and not self._proc.is_alive() and self._ctx.closed:
            if self.exitcode is None:
                self.exitcode = self._proc.exitcode
            return
        self._closing = self._stopping = True
        if self._proc.is_alive():
            self._send(("shutdown",))
            self._proc.join(10)
        self._kill()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        if self.exitcode is None:
            # The receiver thread may have reaped the core (its join) while _kill's join ran: the loser of
            # that waitpid race reads no exit code until the winner has stored it, which it has by now.
            self.exitcode = self._proc.exitcode
        if not self._ctx.closed:
            self._input.close()
            self._output.close()
            self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- internals ----------------------------------------------------------------------------------

    def _send(self, command: tuple) -> None:
        """Never blocks the caller (the event loop): the message goes to ZeroMQ's unbounded queue. Only
        a core that has gone can refuse it (no peer on the socket), and then there is nobody to tell."""
        data = _dumps(command)
        with self._send_lock:
            if not self._input.closed:
                with contextlib.suppress(zmq.Again):
                    self._input.send(data, zmq.NOBLOCK)

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(5)
        self.exitcode = self._proc.exitcode

    def _wait_ready(self) -> tuple[CoreInfo, CoreStats]:
        poller = zmq.Poller()
        poller.register(self._output, zmq.POLLIN)
        poller.register(self._proc.sentinel, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._output in events:
                message = pickle.loads(self._output.recv())
                if message[0] == "ready":
                    return message[1], message[2]
                if message[0] == "failed":
                    raise message[1]
            elif self._proc.sentinel in events:
                self._proc.join(5)
                raise EngineDeadError(
                    f"the engine core process exited with code {self._proc.exitcode} while loading the "
                    "model (its log above has the cause)"
                )

    def _receive_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._output, zmq.POLLIN)
        poller.register(self._proc.sentinel, zmq.POLLIN)
        dead_message = None
        while True:
            try:
                events = dict(poller.poll(100))
            except zmq.ZMQError:  # the sockets were closed by close()
                return
            if self._output in events or self._proc.sentinel in events:
                while True:
                    try:
                        message = pickle.loads(self._output.recv(zmq.NOBLOCK))
                    except (zmq.Again, zmq.ZMQError):
                        break
                    if message[0] == "step":
                        self._on_step(*message[1:])
                    elif message[0] == "dead":
                        dead_message = message[1]
            if self._proc.sentinel in events or dead_message is not None:
                self._proc.join(1)
                if self._stopping and dead_message is None:
                    return  # stopped on purpose
                self._on_death(dead_message)
                return

    def _on_death(self, cause: str | None) -> None:
        code = self._proc.exitcode
        self.exitcode = code
        how = (
            f"killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exit code {code}"
        )
        why = f": {cause}" if cause else ""
        self._error = f"the engine core process has died ({how}{why})"
        log.error("the engine core process died (%s%s); failing every open request", how, why)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream in list(self._streams.values()):
            by_loop.setdefault(stream.loop, []).append((_fail, stream, self._dead_error()))
        _dispatch(by_loop)
        for callback in self._death_callbacks:
            try:
                callback()
            except Exception:
                log.exception("an engine-death callback failed")

    def _on_step(self, admissions: list, outputs: list[CoreOutput], stats: CoreStats) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, error, prompt_ids in admissions:
            stream = self._streams.get(request_id)
            if stream is None:  # the caller left before admission; its abort is queued behind the add
                continue
            if error is None:
                ids = list(stream.prompt) if prompt_ids is None else prompt_ids
                text = stream.prompt if isinstance(stream.prompt, str) else None
                self._states[request_id] = RequestState(
                    self._detok_tokenizer, request_id, text, ids, stream.params, stream.arrival_time
                )
            by_loop.setdefault(stream.loop, []).append((_resolve, stream.admitted, error))
        for out in outputs:
            state = self._states.get(out.request_id)
            if state is None:
                continue
            stream = self._streams.get(out.request_id)
            if stream is None:  # the caller left; its abort is on its way to the core
                del self._states[out.request_id]
                continue
            if state.first_token_time is None:
                state.first_token_time = out.first_token_time
            for update in out.updates:
                stop = state.update(update)
                if stop is not None:
                    self._send(("stop", out.request_id, update.index, stop))
            result = state.output()
            if result.finished:
                del self._states[out.request_id]
            by_loop.setdefault(stream.loop, []).append((stream.queue.put_nowait, result))
        self._metrics.absorb(stats.metrics)
        self._core_stats = stats
        _dispatch(by_loop)


def _dispatch(by_loop: dict) -> None:
    """One thread-safe wake-up per event loop for a whole batch of deliveries."""
    for loop, calls in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that consumer's event loop is closed
            loop.call_soon_threadsafe(_run_all, calls)


def _run_all(calls: list) -> None:
    for fn, *args in calls:
        fn(*args)


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
