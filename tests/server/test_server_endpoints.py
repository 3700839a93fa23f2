"""Response shapes the official client does not check: raw SSE framing, echo, n > 1 streams,
/tokenize and /detokenize (vLLM's shapes), and /metrics (vLLM's names and types)."""

from __future__ import annotations

import json

import pytest


def _events(response) -> list[str]:
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)  # one line per event
    return [e[6:] for e in events]


def test_sse_framing_and_no_usage_unless_asked(client):
    body = {"prompt": "hi", "max_tokens": 3, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    events = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert 1 <= len(chunks) <= 3 and all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)


def test_vllm_benchmark_payloads_are_accepted(client):
    # Exactly what `vllm bench serve` sends (vllm/benchmarks/lib/endpoint_request_func.py).
    completions = {"model": "tiny", "prompt": "hi", "repetition_penalty": 1.0, "max_tokens": 4, "logprobs": None,
                   "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    chunks = [json.loads(e) for e in _events(client.post("/v1/completions", json=completions))[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    chat = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    chunks = [json.loads(e) for e in _events(client.post("/v1/chat/completions", json=chat))[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_echo(client):
    r = client.post(
        "/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "echo": True, "temperature": 0}
    ).json()
    assert r["choices"][0]["text"].startswith("Hello") and len(r["choices"][0]["text"]) > 5
    events = _events(
        client.post(
            "/v1/completions",
            json={"prompt": "Hello", "max_tokens": 2, "echo": True, "stream": True, "temperature": 0},
        )
    )
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert streamed == r["choices"][0]["text"]


def test_stream_n2_batched_prompts_indices(client):
    body = {
        "prompt": ["a", "b"],
        "n": 2,
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = [json.loads(e) for e in _events(client.post("/v1/completions", json=body))[:-1]]
    indices = [c["choices"][0]["index"] for c in chunks if c["choices"]]
    assert sorted(set(indices)) == [0, 1, 2, 3]
    finals = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1, 2, 3]
    assert chunks[-1]["usage"]["completion_tokens"] == 8


def test_chat_stream_n2_opens_each_choice_with_the_role(client):
    body = {"messages": [{"role": "user", "content": "x"}], "n": 2, "max_tokens": 2, "stream": True}
    chunks = [json.loads(e) for e in _events(client.post("/v1/chat/completions", json=body))[:-1]]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in c["delta"] for c in mine[1:])
        assert mine[-1]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_chat_template_override_and_generation_prompt(engine, tokenizer):
    from fastapi.testclient import TestClient

    from qserve.serve.api.app import create_app

    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    with TestClient(create_app(engine, ["tiny"], chat_template=template)) as c:
        c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "yo"}], "max_tokens": 1}
        )
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "yo"}], "max_tokens": 1,
                                              "add_generation_prompt": False})  # fmt: skip
    assert engine.calls[0][0] == tokenizer.encode("[user]yo>>", add_special_tokens=False)
    assert engine.calls[1][0] == tokenizer.encode("[user]yo", add_special_tokens=False)


def test_text_content_parts_are_joined(client, engine, tokenizer):
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], "max_tokens": 1}
    )
    client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}
    )
    assert engine.calls[0][0] == engine.calls[1][0]


def test_tokenize_and_detokenize(client, tokenizer):
    r = client.post(
        "/tokenize", json={"model": "tiny", "prompt": "Hello world", "return_token_strs": True}
    ).json()
    assert r["tokens"] == tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 128 and r["token_strs"] == tokenizer.convert_ids_to_tokens(r["tokens"])
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert (
        chat["tokens"] == tokenizer.encode(rendered, add_special_tokens=False) and chat["token_strs"] is None
    )


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/detokenize", {"tokens": [5, 384]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1.5]}, 400, "tokens[0]"),
        ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
        ("/tokenize", {"prompt": "x", "extra": 1}, 400, "extra"),
        ("/tokenize", {"messages": [], "prompt": "x"}, 400, "messages"),
    ],
)
def test_tokenizer_endpoint_errors(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_names_types_and_values(client, engine, tokenizer):
    client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
    client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 9})
    engine.running, engine.waiting = 3, 2  # gauges are read from engine.stats() at scrape time
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text, m = r.text, _samples(r.text)
    label = '{model_name="tiny"}'
    types = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
             "vllm:kv_cache_usage_perc": "gauge", "vllm:prefix_cache_queries": "counter",
             "vllm:prefix_cache_hits": "counter", "vllm:num_preemptions": "counter", "vllm:prompt_tokens": "counter",
             "vllm:generation_tokens": "counter", "vllm:time_to_first_token_seconds": "histogram",
             "vllm:inter_token_latency_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
             "vllm:request_success": "counter"}  # fmt: skip
    for name, kind in types.items():
        assert f"# TYPE {name} {kind}" in text or f"# TYPE {name}_total {kind}" in text, name
    assert m[f"vllm:num_requests_running{label}"] == 3 and m[f"vllm:num_requests_waiting{label}"] == 2
    prompt_len = len(tokenizer.encode("Hello"))
    assert m[f"vllm:prompt_tokens_total{label}"] == 2 * prompt_len
    assert m[f"vllm:prefix_cache_queries_total{label}"] == 2 * prompt_len
    assert m[f"vllm:generation_tokens_total{label}"] == 4 + 9
    assert m[f"vllm:time_to_first_token_seconds_count{label}"] == 2
    assert m[f"vllm:e2e_request_latency_seconds_count{label}"] == 2
    assert m[f"vllm:inter_token_latency_seconds_count{label}"] == (4 - 1) + (
        9 - 1
    )  # one per token after the first
    assert m['vllm:request_success_total{finished_reason="length",model_name="tiny"}'] == 2
    assert m['vllm:request_success_total{finished_reason="abort",model_name="tiny"}'] == 0
