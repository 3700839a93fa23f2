"""The engine core in its own process (serve/engine_core.py) behind the real app.

- Round trip: completions (streamed and whole, n=2 with seeds and logprobs, a stop string) and chat give
  the same bodies through the split as through the in-process engine: detokenization moved to the API
  process without changing a byte.
- A client that disconnects mid-stream frees its sequence in the core within one step.
- kill -9 of the core: every open request (streaming, waiting in the scheduler) is answered with the
  engine-dead error within a second, /health and new requests get 503.
- `qserve serve` (split by default) exits non-zero when its core is killed.

The core's steps are slowed to core_hooks.STEP_S so "within one step" and "within a second" are
measured against steps much longer than the IPC round trip, also on a loaded machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from core_hooks import slow_steps
from fastapi.testclient import TestClient
from server_testing import MODEL, free_port, serve_in_thread

from qserve.serve.api.app import create_app

DEADLINE_S = 1.0
ENGINE_KW = dict(max_model_len=96, block_size=4, device="cpu", validate=False)


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture(scope="module")
def split(model_dir):
    from qserve.serve.engine_core import EngineCoreClient

    client = EngineCoreClient(model=str(model_dir), **ENGINE_KW, engine_hook=slow_steps, log_level="warning")
    yield client
    client.close()
    assert client.exitcode == 0 and client.death is None


@pytest.fixture(scope="module")
def in_process(model_dir):
    from qserve.serve.async_engine import AsyncLLMEngine

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AsyncLLMEngine(model=str(model_dir), **ENGINE_KW)
    torch.set_num_threads(previous)


def _strip(body: str):
    """A response without what differs between two runs: ids and creation times, and for a stream how
    steps were coalesced into chunks (a reader that falls behind gets several steps in one chunk): per
    choice, the concatenated text, logprobs and the finish reason; the usage chunk."""
    if not body.startswith("data: "):
        out = json.loads(body)
        out.pop("id"), out.pop("created")
        return out
    choices, rest = {}, []
    for line in body.splitlines():
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[len("data: ") :])
        if not event["choices"]:
            rest.append(event["usage"])
        for c in event["choices"]:
            acc = choices.setdefault(c["index"], {"text": "", "finish": []})
            acc["text"] += c.get("text") or (c.get("delta") or {}).get("content") or ""
            for key, values in (c.get("logprobs") or {}).items():
                acc.setdefault(key, []).extend(values or [])
            acc["finish"].append(c["finish_reason"])
    for acc in choices.values():
        acc["finish"] = [f for f in acc["finish"] if f is not None]
    return choices, rest


CASES = [
    ("/v1/completions", {"prompt": "hello world", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                         "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "hello world", "max_tokens": 10, "n": 2, "temperature": 1.0, "seed": 7,
                         "logprobs": 2, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "the", "max_tokens": 10, "n": 2, "temperature": 1.0, "seed": 3,
                         "logprobs": 1, "ignore_eos": True, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 8,
                              "temperature": 0, "logprobs": True, "top_logprobs": 2}),
]  # fmt: skip


def test_split_answers_exactly_as_in_process(split, in_process):
    # Not entered as context managers: the app's lifespan would shut the module's engines down.
    a = TestClient(create_app(split, [MODEL], log_stats_interval=None))
    b = TestClient(create_app(in_process, [MODEL], log_stats_interval=None))
    cases = list(CASES)
    # A stop string taken from the greedy text, so it is hit mid-generation (found in the API
    # process, which then ends the sequence in the core).
    base = b.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 20,
                                          "temperature": 0, "ignore_eos": True}).json()  # fmt: skip
    text = base["choices"][0]["text"]
    assert len(text) > 8
    for stream in (False, True):
        cases.append(("/v1/completions", {"prompt": "abc", "max_tokens": 20, "temperature": 0,
                                          "ignore_eos": True, "stop": [text[4:7]], "stream": stream}))  # fmt: skip
    for path, body in cases:
        body = {"model": MODEL, **body}
        got, want = a.post(path, json=body), b.post(path, json=body)
        assert got.status_code == want.status_code == 200, (got.text, want.text)
        assert _strip(got.text) == _strip(want.text), (path, body)
    stopped = a.post("/v1/completions", json={"model": MODEL, **cases[-2][1]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == text[: text.find(text[4:7])]
    # The core's own numbers reach /metrics: nothing left running, every request counted.
    deadline = time.monotonic() + 5
    while split.stats().num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = split.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
    assert stats.generation_tokens_total > 0 and len(stats.time_to_first_token) == sum(
        stats.requests_finished.values()
    )
    metrics = a.get("/metrics").text
    assert f'vllm:num_requests_running{{model_name="{MODEL}"}} 0.0' in metrics
    assert f'vllm:prefix_cache_queries_total{{model_name="{MODEL}"}} {float(stats.prefix_cache_queries)}' in metrics


def test_disconnect_frees_the_sequence_within_one_step(split):
    aborts: list[int] = []  # the core's step count when the client sent each abort
    real_send = split._send

    def send(command):
        if command[0] == "abort":
            aborts.append(split.steps)
        real_send(command)

    split._send = send
    try:
        with serve_in_thread(create_app(split, [MODEL], log_stats_interval=None)) as url:
            body = {"model": MODEL, "prompt": "a long story", "max_tokens": 80, "temperature": 0,
                    "ignore_eos": True, "stream": True}  # fmt: skip
            with httpx.Client(base_url=url, timeout=30) as client:
                with client.stream("POST", "/v1/completions", json=body) as r:
                    chunks = 0
                    for line in r.iter_lines():
                        chunks += line.startswith("data: {")
                        if chunks == 3:
                            assert split.stats().num_running == 1  # still generating as the client leaves
                            break
                deadline = time.monotonic() + 10
                while not aborts and time.monotonic() < deadline:
                    time.sleep(0.005)
                assert aborts, "the server never aborted the request of the client that left"
                while split.stats().num_running and time.monotonic() < deadline:
                    time.sleep(0.005)
                stats = split.stats()
                assert stats.num_running == 0 and stats.kv_cache_usage == 0.0
                assert split.steps - aborts[0] <= 1, (aborts[0], split.steps)
                assert stats.requests_finished.get("abort", 0) >= 1
    finally:
        split._send = real_send


class Call(threading.Thread):
    """One HTTP request in its own thread; records status, body (or SSE events) and when it ended."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.status: int | None = None
        self.json: dict | None = None
        self.events: list[str] = []
        self.first_event = threading.Event()
        self.ended: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.url, timeout=30) as client,
                client.stream("POST", "/v1/completions", json=self.body) as r,
            ):
                self.status = r.status_code
                if not self.body.get("stream") or r.status_code != 200:
                    r.read()
                    self.json = r.json()
                else:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            self.events.append(line[len("data: ") :])
                            self.first_event.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.ended = time.monotonic()


def completion(stream: bool, max_tokens: int) -> dict:
    return {"model": MODEL, "prompt": "hello world", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": stream}  # fmt: skip


def test_killed_core_fails_every_open_request_within_a_second(model_dir):
    from qserve.serve.engine_core import EngineCoreClient

    engine = EngineCoreClient(model=str(model_dir), **{**ENGINE_KW, "max_num_seqs": 1}, engine_hook=slow_steps,
                              log_level="warning")  # fmt: skip
    deaths = []
    engine.on_death(lambda: deaths.append(time.monotonic()))
    try:
        with serve_in_thread(create_app(engine, [MODEL], log_stats_interval=None)) as url:
            running = Call(url, completion(stream=True, max_tokens=80))
            running.start()
            assert running.first_event.wait(30), "the streaming request never produced a token"
            waiting = [Call(url, completion(stream=False, max_tokens=8)) for _ in range(2)]
            for call in waiting:
                call.start()
            deadline = time.monotonic() + 30
            while engine.stats().num_waiting < 2:
                assert time.monotonic() < deadline, "two requests never queued behind the running one"
                time.sleep(0.01)

            killed = time.monotonic()
            os.kill(engine.core_pid, signal.SIGKILL)
            calls = [running, *waiting]
            for call in calls:
                call.join(DEADLINE_S + 5)
            assert all(c.error is None for c in calls), [c.error for c in calls]
            assert all(c.ended is not None for c in calls), [(c.status, c.json, c.events[-3:]) for c in calls]
            slowest = max(c.ended for c in calls) - killed
            assert slowest < DEADLINE_S, f"the last request was answered {slowest:.2f} s after the kill"
            for call in waiting:
                assert call.status == 503, (call.status, call.json)
                assert call.json["error"]["code"] == "engine_dead", call.json
            assert running.status == 200 and running.events[-1] == "[DONE]"
            assert json.loads(running.events[-2])["error"]["code"] == "engine_dead"
            with httpx.Client(base_url=url, timeout=10) as client:
                assert client.get("/health").status_code == 503
                late = client.post("/v1/completions", json=completion(stream=False, max_tokens=4))
                assert late.status_code == 503 and late.json()["error"]["code"] == "engine_dead"
        assert deaths and not engine.is_healthy
        assert "SIGKILL" in engine.death
    finally:
        engine.close()


def test_qserve_serve_exits_nonzero_when_its_core_is_killed(model_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "qserve.cli", "serve", str(model_dir), "--port", str(port), "--served-model-name",
           MODEL, "--kv-cache-memory", "4MiB", "--disable-log-stats"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        core_pid = None
        lines = []
        for line in proc.stdout:  # the banner comes before uvicorn starts
            lines.append(line)
            if m := re.match(r"engine core:\s+process (\d+)", line):
                core_pid = int(m.group(1))
                break
        assert core_pid is not None, "".join(lines)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "qserve serve did not become healthy"
            time.sleep(0.1)
        running = Call(url, completion(stream=True, max_tokens=480))  # seconds of decoding, unslowed
        running.start()
        assert running.first_event.wait(30)
        killed = time.monotonic()
        os.kill(core_pid, signal.SIGKILL)
        running.join(DEADLINE_S + 5)
        assert running.ended is not None and running.ended - killed < DEADLINE_S
        assert json.loads(running.events[-2])["error"]["code"] == "engine_dead"
        assert proc.wait(30) != 0
        rest = proc.stdout.read()
        assert "engine core process has died (killed by SIGKILL)" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_close_from_two_threads_at_once_returns_with_the_exit_code_in_both(model_dir):
    # A server's shutdown thread and the client's owner may close it at the same moment: the second call
    # waits for the first instead of returning early with the core still exiting (exitcode None).
    from qserve.serve.engine_core import EngineCoreClient

    engine = EngineCoreClient(model=str(model_dir), **ENGINE_KW, log_level="warning")
    seen = []
    barrier = threading.Barrier(2)

    def close():
        barrier.wait()
        engine.close()
        seen.append(engine.exitcode)

    threads = [threading.Thread(target=close) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen == [0, 0]


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 2), (4, 3), (16, 15)])
def test_core_threads_keep_every_cpu_up_to_two_and_leave_one_to_the_api_above(monkeypatch, cpus, expected):
    from qserve.serve import engine_core

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(cpus)
        engine_core._set_core_threads()
        assert torch.get_num_threads() == expected
        torch.set_num_threads(cpus)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice stands
        engine_core._set_core_threads()
        assert torch.get_num_threads() == cpus
    finally:
        torch.set_num_threads(previous)
