"""Running the app under uvicorn with a graceful shutdown that fits Kubernetes.

On SIGTERM (or Ctrl-C) the server does not stop listening at once, as plain uvicorn does: it first
drains. New requests, `/health` included, get 503 with a JSON error (the readiness probe fails, load
balancers move on, a client sees why), while the requests already in flight, streams included, run to
their end. Once none is left, or `shutdown_timeout` seconds have passed (then the rest are cancelled and
the engine aborts them), uvicorn closes the listener and the connections, the app's lifespan stops the
engine, and the process exits 0. A second signal during the drain stops waiting.

The event loop and HTTP parser are pinned (asyncio, h11) rather than left to uvicorn's "auto", which
picks uvloop and httptools whenever they happen to be installed (Ray Serve brings both): the server
then behaves the same in every environment it is tested and deployed in.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from qserve.serve.api.config import DEFAULT_SHUTDOWN_TIMEOUT
from qserve.serve.api.middleware import DrainState

log = logging.getLogger("qserve.serve.api")

EVENT_LOOP = "asyncio"
HTTP_PROTOCOL = "h11"
# Once drained, how long uvicorn waits for the idle connections to close. When the drain is cut short
# (grace period over, or a second signal) it waits 0 s: the requests still running are cancelled at once,
# so `--shutdown-timeout N` means their streams end N s after SIGTERM, not N s plus this wait.
_CANCEL_WAIT = 2.0
# Signals closer together than this count as one: a person's second Ctrl-C comes later than that.
_SAME_SIGNAL_S = 0.5


def uvicorn_config(app, host: str, port: int, **kwargs) -> uvicorn.Config:
    """uvicorn's Config with the server's pinned event loop and HTTP parser (the tests use it too)."""
    kwargs.setdefault("loop", EVENT_LOOP)
    kwargs.setdefault("http", HTTP_PROTOCOL)
    return uvicorn.Config(app, host=host, port=port, **kwargs)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT starts a drain of `drain` instead of an immediate shutdown;
    the process exits 0 afterwards (plain uvicorn re-raises the signal, so the exit status is -15)."""

    def __init__(self, config: uvicorn.Config, drain: DrainState, shutdown_timeout: float) -> None:
        if shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {shutdown_timeout}")
        config.timeout_graceful_shutdown = _CANCEL_WAIT
        super().__init__(config)
        self.drain = drain
        self.shutdown_timeout = shutdown_timeout
        self._announced = False
        self._last_signal = float("-inf")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: only flag changes here; on_tick (on the loop) logs and decides.
        now = time.monotonic()
        if now - self._last_signal < _SAME_SIGNAL_S:
            return  # one signal delivered twice (uvloop does that), not a second one
        self._last_signal = now
        if not self.drain.draining:
            self.drain.begin(self.shutdown_timeout, signal.Signals(sig).name)
        elif sig == signal.SIGINT and self.should_exit:
            self.force_exit = True  # a third Ctrl-C: stop waiting for anything
        else:  # a second signal: stop draining now, aborting what is still running
            self._cut(self.drain.in_flight > 0)

    def _cut(self, requests_left: bool) -> None:
        """Stop now; requests still in flight are cancelled by uvicorn's shutdown without its usual wait
        (their engine requests are aborted as the cancelled handlers unwind). Signal-handler safe."""
        self.drain.cut_short = requests_left
        if requests_left:
            self.config.timeout_graceful_shutdown = 0.0
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        state = self.drain
        if state.draining and not self.should_exit:
            if not self._announced:
                self._announced = True
                log.info("%s: draining %d request(s) in flight for up to %g s; new requests get 503 "
                         "(send the signal again to stop now)", state.reason, state.in_flight, state.timeout)  # fmt: skip
            if state.in_flight == 0:
                log.info("drained: no request in flight; shutting down")
                self.should_exit = True
            elif time.monotonic() >= (state.deadline or 0.0):
                log.warning("grace period of %g s over with %d request(s) still in flight: aborting them",
                            state.timeout, state.in_flight)  # fmt: skip
                self._cut(True)
        if self.should_exit and not state.draining:
            state.begin(0.0)  # shutting down for another reason: refuse new requests meanwhile
        return await super().on_tick(counter)


def serve_app(
    app, host: str, port: int, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT, **kwargs
) -> None:
    """Serves `app` (from create_app) until a signal, then drains as the module docstring says."""
    server = DrainingServer(uvicorn_config(app, host, port, **kwargs), app.state.drain, shutdown_timeout)
    server.run()
