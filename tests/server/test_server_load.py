"""Concurrency against a live server: disconnects abort engine work, a full queue sheds load with 429."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from fake_engine import FakeEngine
from server_testing import serve_in_thread

from qserve.serve.api.app import create_app
from qserve.serve.sampling_params import SamplingParams


def _expected(engine: FakeEngine, prompt: str, max_tokens: int) -> str:
    ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return engine.tokenizer.decode([engine.token(ids, params, 0, i) for i in range(max_tokens)])


async def _until(predicate, timeout: float = 10.0) -> None:
    """Awaits `predicate()` (a slow CI machine can take far longer than a fixed sleep to deliver a request)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"condition not reached within {timeout:.0f} s"
        await asyncio.sleep(0.01)


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


async def _stream(client: httpx.AsyncClient, prompt: str, max_tokens: int, leave_after: int | None):
    """Reads one streamed completion; with `leave_after`, closes the connection after that many chunks."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    text, usage, chunks, request_id = "", None, 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return {"text": text, "usage": usage, "id": request_id, "done": True}
            chunk = json.loads(line[6:])
            request_id = chunk["id"]
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
                chunks += 1
            else:
                usage = chunk["usage"]
            if leave_after is not None and chunks >= leave_after:
                return {"id": request_id, "done": False}  # leaving the block closes the connection
    return {"id": request_id, "done": False}


def test_200_streams_with_a_third_disconnecting(tokenizer):
    engine = FakeEngine(tokenizer, delay=0.01)
    app = create_app(engine, ["tiny"])
    n, max_tokens = 200, 20

    async def run(url):
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
            # A leaving client asks for many tokens: its request must still be running when the server
            # notices the closed connection, even on a loaded machine (20 tokens could all be made first).
            jobs = [
                _stream(client, f"prompt {i}", 100, 2)
                if i % 3 == 0
                else _stream(client, f"prompt {i}", max_tokens, None)
                for i in range(n)
            ]
            return await asyncio.gather(*jobs)

    with serve_in_thread(app) as url:
        results = asyncio.run(run(url))
        assert _wait_until(lambda: not engine.live)
        metrics = httpx.get(f"{url}/metrics").text

    left = [r for i, r in enumerate(results) if i % 3 == 0]
    stayed = [(i, r) for i, r in enumerate(results) if i % 3 != 0]
    assert all(r["done"] for _, r in stayed)
    for i, r in stayed:
        assert r["text"] == _expected(engine, f"prompt {i}", max_tokens)
        assert r["usage"]["completion_tokens"] == max_tokens
        assert engine.finished[r["id"]] == "length"
    # Every disconnected client's request was aborted before it could finish.
    assert all(r["id"] in engine.aborted or r["id"] not in engine.finished for r in left)
    assert sum(r["id"] in engine.finished for r in left) == 0
    assert engine.used_blocks == 0 and engine.running == 0 and engine.waiting == 0
    assert f'vllm:request_success_total{{finished_reason="abort",model_name="tiny"}} {len(left)}.0' in metrics
    assert (
        f'vllm:request_success_total{{finished_reason="length",model_name="tiny"}} {len(stayed)}.0' in metrics
    )


def test_non_streaming_disconnect_aborts(tokenizer):
    engine = FakeEngine(tokenizer, delay=0.05)
    with serve_in_thread(create_app(engine, ["tiny"])) as url:

        async def leave_early():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                body = {"model": "tiny", "prompt": "hi", "max_tokens": 100}
                task = asyncio.create_task(client.post("/v1/completions", json=body))
                await _until(lambda: engine.running == 1)
                await asyncio.sleep(0.2)
                task.cancel()

        asyncio.run(leave_early())
        assert _wait_until(lambda: not engine.live, timeout=3.0)  # not the 5 s the request would take
    assert len(engine.calls) == 1 and not engine.finished
    assert engine.used_blocks == 0


def test_queue_overflow_gives_429_while_admitted_requests_complete(tokenizer):
    engine = FakeEngine(tokenizer, delay=0.2, max_running=2, max_waiting=2)
    with serve_in_thread(create_app(engine, ["tiny"])) as url:

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                bodies = [
                    {"model": "tiny", "prompt": f"p{i}", "max_tokens": 5, "temperature": 0} for i in range(10)
                ]
                return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

        responses = asyncio.run(burst())
    ok = [(i, r) for i, r in enumerate(responses) if r.status_code == 200]
    full = [r for r in responses if r.status_code == 429]
    assert len(ok) >= 4 and len(full) >= 1 and len(ok) + len(full) == 10
    for r in full:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
    for i, r in ok:
        assert r.json()["choices"][0]["text"] == _expected(engine, f"p{i}", 5)
    assert engine.used_blocks == 0 and not engine.live


def test_streaming_queue_overflow_is_a_status_not_a_broken_stream(tokenizer):
    engine = FakeEngine(tokenizer, delay=0.1, max_running=1, max_waiting=1)
    with serve_in_thread(create_app(engine, ["tiny"])) as url:

        async def three():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                body = {"model": "tiny", "prompt": "x", "max_tokens": 20, "stream": True}
                running = asyncio.create_task(client.post("/v1/completions", json=body))
                await _until(lambda: engine.running == 1)
                waiting = asyncio.create_task(client.post("/v1/completions", json=body))
                await _until(lambda: engine.waiting == 1)
                refused = await client.post("/v1/completions", json=body)
                return await running, await waiting, refused

        running, waiting, refused = asyncio.run(three())
    for ok in (running, waiting):
        assert ok.status_code == 200 and ok.text.endswith("data: [DONE]\n\n")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    assert refused.headers["content-type"].startswith("application/json")


def test_sigterm_path_shuts_the_engine_down_draining(tokenizer):
    engine = FakeEngine(tokenizer)
    with serve_in_thread(create_app(engine, ["tiny"])):
        assert engine.shutdown_calls == []
    assert engine.shutdown_calls == [True]
