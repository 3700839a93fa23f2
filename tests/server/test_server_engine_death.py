"""An engine whose loop dies fails every open request at once, and the server says so.

The real AsyncLLMEngine on a tiny random model behind a live uvicorn server. Its runner is wrapped so
that a test can hold the engine inside a step and then make that step raise: at that moment one
request is streaming, two wait in the scheduler's queue (max_num_seqs=1), and two more sit in the
engine's inbox, not yet admitted (the case that used to hang). Every one of them must be answered with
an OpenAI-shaped error within a second, /health must turn 503, new requests must get 503, and the
cause must be logged once.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest
import torch
from server_testing import MODEL, serve_in_thread

from qserve.serve.api.app import create_app
from qserve.testing import make_tiny_model

DEADLINE_S = 1.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add barrier waits on a loaded CPU
    yield make_tiny_model(tmp_path_factory.mktemp("death") / "llama", "llama", tie_word_embeddings=False)
    torch.set_num_threads(previous)


class KillSwitch:
    """Wraps the runner's execute: slow steps until `hold`, then blocks in the step until `release`,
    then raises (a kernel that crashes)."""

    def __init__(self, real) -> None:
        self.real = real
        self.hold = threading.Event()
        self.blocked = threading.Event()
        self.release = threading.Event()

    def __call__(self, scheduled, states):
        if self.hold.is_set():
            self.blocked.set()
            self.release.wait(30)
            raise RuntimeError("kernel exploded")
        time.sleep(0.02)  # long enough for the test to line requests up behind the running one
        return self.real(scheduled, states)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Call(threading.Thread):
    """One HTTP request in its own thread; records status, body (or SSE events) and when it ended."""

    def __init__(self, url: str, body: dict, path: str = "/v1/completions") -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.path = url, body, path
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
                client.stream("POST", self.path, json=self.body) as r,
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


def test_engine_death_fails_running_waiting_and_unadmitted_requests_at_once(model_dir):
    from qserve.serve.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(model=str(model_dir), max_model_len=96, block_size=4, device="cpu", validate=False,
                            max_num_seqs=1, max_num_batched_tokens=32)  # fmt: skip
    switch = KillSwitch(engine.engine.runner.execute)
    engine.engine.runner.execute = switch
    records = Records()
    root = logging.getLogger()
    root.addHandler(records)
    try:
        with serve_in_thread(create_app(engine, [MODEL])) as url:
            running = Call(url, completion(stream=True, max_tokens=80))
            running.start()
            assert running.first_event.wait(30), "the streaming request never produced a token"
            waiting = [Call(url, completion(stream=False, max_tokens=8)) for _ in range(2)]
            for call in waiting:
                call.start()
            wait_for(lambda: engine.stats().num_waiting == 2, "two requests in the scheduler's queue")
            switch.hold.set()
            assert switch.blocked.wait(30)
            # The engine thread is inside a step: these two stay in its inbox, never admitted.
            unadmitted = [
                Call(url, completion(stream=True, max_tokens=8)),
                Call(url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}, "/v1/chat/completions"),
            ]  # fmt: skip
            for call in unadmitted:
                call.start()
            wait_for(lambda: engine._inbox.qsize() == 2, "two add commands in the engine's inbox")

            killed = time.monotonic()
            switch.release.set()
            calls = [running, *waiting, *unadmitted]
            for call in calls:
                call.join(DEADLINE_S + 5)
            assert all(c.error is None for c in calls), [c.error for c in calls]
            assert all(c.ended is not None for c in calls), "a request still hangs after the engine died"
            slowest = max(c.ended for c in calls) - killed
            assert slowest < DEADLINE_S, f"the last request was answered {slowest:.2f} s after the death"

            # Not yet streaming: a 503 in OpenAI's error shape.
            for call in [*waiting, *unadmitted]:
                assert call.status == 503, (call.status, call.json)
                error = call.json["error"]
                assert error["code"] == "engine_dead" and error["type"] == "service_unavailable_error"
                assert "restart" in error["message"] and "kernel exploded" not in error["message"]
            # Streaming when it died: an SSE error event, then [DONE], then the stream closes.
            assert running.status == 200 and running.events[-1] == "[DONE]"
            last = json.loads(running.events[-2])
            assert last["error"]["code"] == "engine_dead", last
            assert all("choices" in json.loads(e) for e in running.events[:-2])

            with httpx.Client(base_url=url, timeout=10) as client:
                health = client.get("/health")
                assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
                late = client.post("/v1/completions", json=completion(stream=False, max_tokens=4))
                assert late.status_code == 503 and late.json()["error"]["code"] == "engine_dead"
                late_stream = client.post("/v1/completions", json=completion(stream=True, max_tokens=4))
                assert late_stream.status_code == 503
    finally:
        root.removeHandler(records)

    # The cause is logged once, with its traceback; no request logs it again.
    errors = [r for r in records.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info and "kernel exploded" in str(errors[0].exc_info[1])
    assert engine.engine.scheduler.num_running + engine.engine.scheduler.num_waiting == 3  # frozen at death


def test_request_registered_as_the_engine_dies_is_failed_not_stranded(model_dir):
    """The narrow race: a stream registered while the engine thread fails the open ones. Whichever
    side runs first, generate() raises EngineDeadError promptly instead of waiting for an admission
    that cannot come."""
    import asyncio

    from qserve.serve.async_engine import AsyncLLMEngine, EngineDeadError
    from qserve.serve.sampling_params import SamplingParams

    engine = AsyncLLMEngine(model=str(model_dir), max_model_len=96, block_size=4, device="cpu", validate=False)
    switch = KillSwitch(engine.engine.runner.execute)
    switch.hold.set()
    switch.release.set()  # the first step raises at once
    engine.engine.runner.execute = switch
    params = SamplingParams(max_tokens=4)

    async def one(rid: str) -> None:
        async for _ in engine.generate("hello", params, rid):
            pass

    async def main() -> list:
        tasks = [asyncio.create_task(one(f"r{i}")) for i in range(20)]
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), DEADLINE_S + 4)

    results = asyncio.run(main())
    assert all(isinstance(r, EngineDeadError) for r in results), results
    assert not engine.is_healthy
