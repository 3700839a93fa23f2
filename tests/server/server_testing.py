"""Helpers shared by the server tests (a module of its own: `conftest` is not importable by name
when several test folders each have one)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from qserve.serve.api.shutdown import uvicorn_config

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, timeout: float = 20.0):
    """Runs `app` under uvicorn on a free port in a background thread; yields the base URL."""
    # The event loop and HTTP parser `qserve serve` pins, whatever else is installed.
    config = uvicorn_config(app, "127.0.0.1", free_port(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
