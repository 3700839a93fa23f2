"""`qserve serve` for real: a subprocess on a tiny random Llama, the real engine, the official client.

One server for the module (starting one costs the torch import). The last test sends SIGTERM
mid-stream and checks that the stream still completes (drain) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_testing import free_port

MAX_NUM_SEQS, MAX_QUEUE = 4, 16
EXTRA = {"ignore_eos": True}  # vLLM extras go through the client's extra_body


def _flatten_logits(model_dir: Path) -> None:
    # The tiny model's logits are very peaked (greedy is decisive); shrinking the final norm makes
    # temperature sampling spread over many tokens, so different seeds give different text.
    from safetensors.numpy import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 0.02
    save_file(tensors, path, metadata={"format": "pt"})


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    model_dir = tmp_path_factory.mktemp("served") / "tiny"
    shutil.copytree(tiny_llama_dir, model_dir)  # the shared session model stays untouched
    _flatten_logits(model_dir)
    port = free_port()
    cmd = [sys.executable, "-m", "qserve.cli", "serve", str(model_dir), "--port", str(port), "--served-model-name",
           "tiny", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE), "--kv-cache-memory", "4MiB",
           "--log-level", "info"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"qserve serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("qserve serve did not become healthy in 120 s")
        time.sleep(0.2)
    yield url, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_startup_banner(server):
    _, proc = server
    # The banner is printed before uvicorn starts; read it without blocking on the live pipe.
    os.set_blocking(proc.stdout.fileno(), False)
    banner = proc.stdout.read() or ""
    assert "unquantized" in banner and "KV cache:" in banner and "tokens" in banner
    assert f"{server[0]}/v1" in banner


def test_completion_chat_and_models(oai):
    a = oai.completions.create(model="tiny", prompt="The capital of France", max_tokens=8, temperature=0)
    b = oai.completions.create(model="tiny", prompt="The capital of France", max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 8
    chat = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    assert [m.id for m in oai.models.list().data] == ["tiny"]


def test_streaming_with_usage_equals_whole(oai):
    kw = dict(model="tiny", prompt="Hello", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = oai.completions.create(**kw)
    chunks = list(oai.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_n2_stop_logprobs_and_seed(oai):
    two = oai.completions.create(
        model="tiny", prompt="Hi", max_tokens=6, n=2, temperature=1.0, seed=1, extra_body=EXTRA
    )
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 12
    assert two.choices[0].text != two.choices[1].text

    def sample(seed):
        return (
            oai.completions.create(model="tiny", prompt="Hi", max_tokens=8, temperature=1.0, seed=seed)
            .choices[0]
            .text
        )

    assert sample(5) == sample(5) and sample(5) != sample(6)

    full = oai.completions.create(
        model="tiny", prompt="Hi", max_tokens=12, temperature=1.0, seed=3, extra_body=EXTRA
    )
    text = full.choices[0].text
    stop = text[4:6]
    cut = oai.completions.create(
        model="tiny", prompt="Hi", max_tokens=12, temperature=1.0, seed=3, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"

    lp = (
        oai.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0, logprobs=3)
        .choices[0]
        .logprobs
    )
    assert len(lp.tokens) == 3 and all(len(t) == 3 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)


async def _stream(client, prompt, leave_after):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    text, chunks = "", 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return text
            if line.startswith("data: ") and (choices := json.loads(line[6:])["choices"]):
                text += choices[0]["text"]
                chunks += 1
                if leave_after and chunks >= leave_after:
                    return None
    return None


def test_disconnects_free_every_block(server, oai):
    url, _ = server
    prompts = [f"prompt number {i}" for i in range(12)]  # all fit in the running + waiting bound
    expected = {p: oai.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0, extra_body=EXTRA)
                .choices[0].text for p in prompts}  # fmt: skip

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(
                *(_stream(client, p, 2 if i % 3 == 0 else None) for i, p in enumerate(prompts))
            )

    texts = asyncio.run(run())
    for i, (p, text) in enumerate(zip(prompts, texts, strict=True)):
        if i % 3:
            assert text == expected[p]
    deadline = time.monotonic() + 10
    while (m := _metrics(url))[
        'vllm:num_requests_running{model_name="tiny"}'
    ] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m['vllm:num_requests_running{model_name="tiny"}'] == 0
    assert m['vllm:num_requests_waiting{model_name="tiny"}'] == 0
    assert m['vllm:kv_cache_usage_perc{model_name="tiny"}'] == 0.0
    assert m['vllm:request_success_total{finished_reason="abort",model_name="tiny"}'] >= 1


def test_queue_overflow_429_while_admitted_complete(server, oai):
    url, _ = server
    # Long enough that the burst arrives while the first batch still runs.
    kw = {"model": "tiny", "prompt": "load", "max_tokens": 96, "temperature": 0, "ignore_eos": True}
    expected = oai.completions.create(**{k: v for k, v in kw.items() if k != "ignore_eos"}, extra_body=EXTRA)
    burst_size = 2 * (MAX_NUM_SEQS + MAX_QUEUE)

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=kw) for _ in range(burst_size)))

    responses = asyncio.run(burst())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == burst_size and refused and len(ok) >= MAX_NUM_SEQS
    assert all(r.json()["choices"][0]["text"] == expected.choices[0].text for r in ok)
    assert all(r.headers["retry-after"] == "1" for r in refused)


def test_sigterm_drains_in_flight_stream(server):
    url, proc = server
    body = {
        "model": "tiny",
        "prompt": "drain",
        "max_tokens": 48,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    lines = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 2:
                proc.send_signal(signal.SIGTERM)
    assert lines[-1] == "data: [DONE]"
    tokens = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert tokens[-2]["choices"][0]["finish_reason"] == "length"
    assert tokens[-1]["usage"]["completion_tokens"] == 48  # every token, though chunks may coalesce
    assert proc.wait(30) == 0  # a drained shutdown is a clean exit (serve/api/shutdown.py)
    assert "engine stopped after draining" in proc.stdout.read()
