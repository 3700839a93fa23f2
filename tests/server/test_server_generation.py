"""Generation (the engine requests behind one HTTP request) without HTTP: coalescing, refusal, disconnect."""

from __future__ import annotations

import asyncio

import pytest
from fake_engine import FakeEngine

from qserve.serve.api.generation import ClientDisconnected, Generation
from qserve.serve.api.metrics import ServerMetrics
from qserve.serve.sampling_params import SamplingParams
from qserve.serve.sequence import QueueFullError


def _generation(engine, prompts, params, receive):
    metrics = ServerMetrics(engine, "tiny")
    return Generation(engine, prompts, params, "req", receive, [metrics.track(len(p)) for p in prompts])


async def _never_disconnects():
    await asyncio.Event().wait()


def test_a_slow_reader_gets_coalesced_cumulative_outputs(tokenizer):
    engine = FakeEngine(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=60)

    async def go():
        gen = _generation(engine, [[5, 6]], params, _never_disconnects)
        await gen.start()
        while engine.live:  # the engine finishes before the reader reads anything more
            await asyncio.sleep(0.01)
        events = [e async for e in gen.events()]
        return events

    events = asyncio.run(go())
    assert len(events) <= 3  # the primed first output, then at most the newest one or two
    assert len(events[-1].output.outputs[0].token_ids) == 60 and events[-1].output.finished


def test_refusal_aborts_the_prompts_already_admitted(tokenizer):
    engine = FakeEngine(tokenizer, delay=0.01, max_waiting=1, max_running=1)
    params = SamplingParams(temperature=0.0, max_tokens=50)

    async def go():
        gen = _generation(engine, [[5], [6], [7]], params, _never_disconnects)
        with pytest.raises(QueueFullError):
            await gen.start()
        await asyncio.sleep(0.05)

    asyncio.run(go())
    assert not engine.live and engine.used_blocks == 0 and not engine.finished


def test_disconnect_raises_and_aborts(tokenizer):
    engine = FakeEngine(tokenizer, delay=0.01)
    params = SamplingParams(temperature=0.0, max_tokens=500)
    gone = asyncio.Event()

    async def receive():
        await gone.wait()
        return {"type": "http.disconnect"}

    async def go():
        gen = _generation(engine, [[5], [6]], params, receive)
        await gen.start()
        gone.set()
        with pytest.raises(ClientDisconnected):
            async for _ in gen.events():
                pass

    asyncio.run(go())
    assert not engine.live and engine.used_blocks == 0 and not engine.finished
