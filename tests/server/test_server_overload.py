"""Overload stays graceful on the real engine: past --max-queue a request gets 429 with Retry-After, every
admitted request completes in full, none is lost or left holding KV blocks, and the server is serving
normally once the burst is over."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
from server_testing import MODEL, serve_in_thread

from qserve.serve.api.app import create_app
from qserve.testing import make_tiny_model

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add barrier waits on a loaded CPU
    yield make_tiny_model(tmp_path_factory.mktemp("overload") / "llama", "llama", tie_word_embeddings=False)
    torch.set_num_threads(previous)


async def _one(client: httpx.AsyncClient, i: int) -> dict:
    stream = i % 2 == 0
    body = {"model": MODEL, "prompt": f"request {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": stream}  # fmt: skip
    if not stream:
        r = await client.post("/v1/completions", json=body)
        out = {"status": r.status_code, "headers": r.headers, "json": r.json()}
        if r.status_code == 200:
            out["tokens"] = r.json()["usage"]["completion_tokens"]
        return out
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "headers": r.headers, "json": r.json()}
        chunks, done = [], False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
        return {"status": 200, "tokens": len(finish), "finish": finish[-1], "done": done, "chunks": chunks}


def test_burst_past_max_queue_is_answered_429_and_loses_no_request(model_dir):
    from qserve.serve.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(model=str(model_dir), max_model_len=96, block_size=4, device="cpu", validate=False,
                            max_num_seqs=2, max_num_batched_tokens=32, max_waiting=3)  # fmt: skip
    real = engine.engine.runner.execute

    def slow_step(scheduled, states):
        time.sleep(0.03)  # steps slower than the burst arrives, so the queue fills on any machine
        return real(scheduled, states)

    engine.engine.runner.execute = slow_step
    n = 24
    with serve_in_thread(create_app(engine, [MODEL])) as url:

        async def burst() -> list[dict]:
            limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
                return await asyncio.gather(*(_one(client, i) for i in range(n)))

        results = asyncio.run(burst())
        deadline = time.monotonic() + 10
        while engine.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        after = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 3})
        health = httpx.get(f"{url}/health")

    statuses = [r["status"] for r in results]
    assert set(statuses) <= {200, 429}, statuses  # nothing else: no 5xx, no dropped connection
    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    assert len(refused) >= 1 and len(ok) >= 2 + 3, statuses  # at least max_num_seqs + max_queue got in
    for r in refused:
        assert r["headers"]["retry-after"].isdigit() and int(r["headers"]["retry-after"]) >= 1
        error = r["json"]["error"]
        assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
    for r in ok:  # every admitted request ran to its full length
        assert r["tokens"] == MAX_TOKENS
        if "done" in r:
            assert r["done"] and r["finish"] == "length"
    stats = engine.stats()
    assert stats.requests_finished == {"length": len(ok) + 1}  # the burst's admitted ones and `after`
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert engine.engine.scheduler.block_manager.num_used_blocks == 0
    assert after.status_code == 200 and health.status_code == 200
