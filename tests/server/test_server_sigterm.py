"""Graceful shutdown of `qserve serve` (serve/api/shutdown.py): SIGTERM during streaming requests.

A real server process on a tiny random Llama: the streams in flight run to their last token, a new
request and /health get 503 with a JSON error while they do, and the process exits 0. With a short
--shutdown-timeout, streams still running when it ends are cut and the process still exits 0, promptly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fake_engine import FakeEngine
from fastapi.testclient import TestClient
from server_testing import MODEL, free_port

from qserve.serve.api.app import create_app

STREAMS = 3
STREAM_SECONDS = 4.0  # how long the streams should run after SIGTERM: the 503 checks take well under 1 s


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    from qserve.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-long"), family="llama", max_position_embeddings=8192)


def start_server(model: Path, log: Path, *extra: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    cmd = [sys.executable, "-m", "qserve.cli", "serve", str(model), "--port", str(port), "--served-model-name",
           "tiny", "--max-num-seqs", "4", "--kv-cache-memory", "16MiB", "--disable-log-stats", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"qserve serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"qserve serve did not become healthy in 180 s:\n{log.read_text()}")
        time.sleep(0.2)


class Stream(threading.Thread):
    """One streaming completion read to its end in a thread; `started` is set at its first event."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.started = threading.Event()
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self.ended_at = 0.0

    def run(self) -> None:
        body = {"model": "tiny", "prompt": "drain", "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.started.set()
        except BaseException as exc:  # the main thread checks it
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    @property
    def completion_tokens(self) -> int | None:
        events = [json.loads(x[6:]) for x in self.lines if x.startswith("data: {")]
        usage = [e["usage"] for e in events if e.get("usage")]
        return usage[-1]["completion_tokens"] if usage else None


def tokens_for(url: str, seconds: float) -> int:
    """max_tokens for a stream that runs about `seconds` on this machine now (measured, not assumed: a
    fixed count would last seconds on a quiet CI runner and minutes on a loaded one)."""
    body = {"model": "tiny", "prompt": "warm", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    start = time.monotonic()
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200
    rate = 48 / (time.monotonic() - start)
    return int(min(max(rate * seconds, 64), 8000))


def _open_streams(url: str, n: int, max_tokens: int) -> list[Stream]:
    streams = [Stream(url, max_tokens) for _ in range(n)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(60) and s.error is None, s.error
    return streams


def _assert_shutting_down(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]
    assert r.headers["connection"] == "close" and r.headers["retry-after"]


def test_sigterm_finishes_streams_refuses_new_requests_and_exits_0(long_model, tmp_path):
    log = tmp_path / "serve.log"
    url, proc = start_server(long_model, log)
    try:
        max_tokens = tokens_for(url, STREAM_SECONDS)
        streams = _open_streams(url, STREAMS, max_tokens)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{url}/health", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, "/health still 200 10 s after SIGTERM"
            time.sleep(0.02)
        _assert_shutting_down(health)
        new = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "late", "max_tokens": 2},
                         timeout=10)  # fmt: skip
        refused_at = time.monotonic()
        _assert_shutting_down(new)
        assert httpx.get(f"{url}/metrics", timeout=5).status_code == 200  # still scraped while draining
        for s in streams:
            s.join(120)
            assert not s.is_alive() and s.error is None, s.error
        # The refusals happened while the streams were still running, and every stream got every token.
        assert all(s.ended_at > refused_at for s in streams)
        assert all(s.lines[-1] == "data: [DONE]" and s.completion_tokens == max_tokens for s in streams)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert f"SIGTERM: draining {STREAMS} request(s) in flight" in text
    assert "engine stopped after draining its requests" in text and "Traceback" not in text
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def test_grace_period_over_cuts_the_streams_and_still_exits_0(long_model, tmp_path):
    log = tmp_path / "serve.log"
    url, proc = start_server(long_model, log, "--shutdown-timeout", "1")
    try:
        (stream,) = _open_streams(url, 1, tokens_for(url, 20.0))  # runs well past the 1 s
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        exited = time.monotonic() - signalled
        stream.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "grace period of 1 s over with 1 request(s) still in flight: aborting them" in text, text
    assert "requests still running when the drain was cut short were aborted" in text
    assert exited < 20, f"exit took {exited:.1f} s after SIGTERM with --shutdown-timeout 1"
    assert stream.lines[-1] != "data: [DONE]" and stream.completion_tokens is None  # cut, not finished
    # Cut when the grace period ends, not after uvicorn's own wait for connections on top of it.
    assert stream.ended_at - signalled < 10, f"stream ran {stream.ended_at - signalled:.1f} s after SIGTERM"


def test_draining_app_answers_503_except_metrics(tokenizer):
    """The gate on its own (no process): after `begin`, new requests and /health get 503, /metrics not."""
    app = create_app(FakeEngine(tokenizer), [MODEL], log_stats_interval=None)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        app.state.drain.begin(30)
        _assert_shutting_down(client.get("/health"))
        _assert_shutting_down(client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}))
        _assert_shutting_down(client.get("/v1/models"))
        assert client.get("/metrics").status_code == 200 and app.state.drain.in_flight == 0
