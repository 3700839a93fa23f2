"""Every validation rule: the right status, OpenAI error type, `param` and code (fail closed)."""

from __future__ import annotations

import pytest

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
BASE = {CMPL: {"model": "tiny", "prompt": "hi", "max_tokens": 2}, CHAT: {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}  # fmt: skip
USER = {"role": "user", "content": "hi"}

# (endpoint, fields merged into the valid base body (None value = drop the key), status, param, code)
CASES = [
    (CMPL, {"foo": 1}, 400, "foo", "unknown_parameter"),
    (CMPL, {"logit_bias": {"5": 1}}, 400, "logit_bias", "unknown_parameter"),
    (CMPL, {"best_of": 1}, 400, "best_of", "unknown_parameter"),
    (CMPL, {"max_completion_tokens": 4}, 400, "max_completion_tokens", "unknown_parameter"),
    (CMPL, {"prompt": None}, 400, "prompt", "missing_required_parameter"),
    (CMPL, {"prompt": 5}, 400, "prompt", "invalid_value"),
    (CMPL, {"prompt": []}, 400, "prompt", "invalid_value"),
    (CMPL, {"prompt": [1, "a"]}, 400, "prompt", "invalid_value"),
    (CMPL, {"prompt": [-1]}, 400, "prompt", "invalid_value"),
    (CMPL, {"prompt": [1000]}, 400, "prompt", "invalid_value"),
    (CMPL, {"prompt": [[5, 6], [1000]]}, 400, "prompt", "invalid_value"),
    (CMPL, {"prompt": [[]]}, 400, "prompt", "invalid_value"),
    (CMPL, {"prompt": ["a"] * 33}, 400, "prompt", "invalid_value"),
    (CMPL, {"prompt": [5] * 128}, 400, "prompt", "context_length_exceeded"),
    (CMPL, {"prompt": [5] * 100, "max_tokens": 29}, 400, "max_tokens", "context_length_exceeded"),
    (CMPL, {"max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    (CMPL, {"max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    (CMPL, {"max_tokens": 5.0}, 400, "max_tokens", "invalid_value"),
    (CMPL, {"max_tokens": True}, 400, "max_tokens", "invalid_value"),
    (CMPL, {"temperature": -0.1}, 400, "temperature", "invalid_value"),
    (CMPL, {"temperature": 2.5}, 400, "temperature", "invalid_value"),
    (CMPL, {"temperature": "1"}, 400, "temperature", "invalid_value"),
    (CMPL, {"top_p": 0}, 400, "top_p", "invalid_value"),
    (CMPL, {"top_p": 1.01}, 400, "top_p", "invalid_value"),
    (CMPL, {"n": 0}, 400, "n", "invalid_value"),
    (CMPL, {"n": 17}, 400, "n", "invalid_value"),
    (CMPL, {"n": 1.5}, 400, "n", "invalid_value"),
    (CMPL, {"stop": ""}, 400, "stop", "invalid_value"),
    (CMPL, {"stop": ["a"] * 17}, 400, "stop", "invalid_value"),
    (CMPL, {"stop": [1]}, 400, "stop", "invalid_value"),
    (CMPL, {"seed": -1}, 400, "seed", "invalid_value"),
    (CMPL, {"seed": 2**63}, 400, "seed", "invalid_value"),
    (CMPL, {"seed": "1"}, 400, "seed", "invalid_value"),
    (CMPL, {"presence_penalty": 2.5}, 400, "presence_penalty", "invalid_value"),
    (CMPL, {"frequency_penalty": -3}, 400, "frequency_penalty", "invalid_value"),
    (CMPL, {"logprobs": 21}, 400, "logprobs", "invalid_value"),
    (CMPL, {"logprobs": -1}, 400, "logprobs", "invalid_value"),
    (CMPL, {"logprobs": True}, 400, "logprobs", "invalid_value"),
    (CMPL, {"echo": "yes"}, 400, "echo", "invalid_value"),
    (CMPL, {"echo": True, "logprobs": 1}, 400, "echo", "invalid_value"),
    (CMPL, {"stream": "true"}, 400, "stream", "invalid_value"),
    (CMPL, {"stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    (
        CMPL,
        {"stream": False, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "invalid_value",
    ),
    (
        CMPL,
        {"stream": True, "stream_options": {"include_usage": True, "x": 1}},
        400,
        "stream_options.x",
        "unknown_parameter",
    ),
    (
        CMPL,
        {"stream": True, "stream_options": {"include_usage": 1}},
        400,
        "stream_options.include_usage",
        "invalid_value",
    ),
    (CMPL, {"user": 5}, 400, "user", "invalid_value"),
    (CMPL, {"top_k": -2}, 400, "top_k", "invalid_value"),
    (CMPL, {"min_p": 1.5}, 400, "min_p", "invalid_value"),
    (CMPL, {"repetition_penalty": 0}, 400, "repetition_penalty", "invalid_value"),
    (CMPL, {"stop_token_ids": [-1]}, 400, "stop_token_ids", "invalid_value"),
    (CMPL, {"stop_token_ids": [999]}, 400, "stop_token_ids", "invalid_value"),
    (CMPL, {"ignore_eos": "no"}, 400, "ignore_eos", "invalid_value"),
    (CMPL, {"min_tokens": -1}, 400, "min_tokens", "invalid_value"),
    (CMPL, {"min_tokens": 3, "max_tokens": 2}, 400, "min_tokens", "invalid_value"),
    (
        CMPL,
        {"min_tokens": 30, "max_tokens": None},
        400,
        "min_tokens",
        "invalid_value",
    ),  # default budget is 16
    (CMPL, {"skip_special_tokens": 1}, 400, "skip_special_tokens", "invalid_value"),
    (CMPL, {"include_stop_str_in_output": "x"}, 400, "include_stop_str_in_output", "invalid_value"),
    (CMPL, {"model": "gpt-4"}, 404, "model", "model_not_found"),
    (CMPL, {"model": 5}, 400, "model", "invalid_value"),
    (CHAT, {"messages": []}, 400, "messages", "invalid_value"),
    (CHAT, {"messages": None}, 400, "messages", "missing_required_parameter"),
    (CHAT, {"messages": [{"role": "developer", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    (
        CHAT,
        {"messages": [USER, {"role": "assistant", "content": 5}]},
        400,
        "messages[1].content",
        "invalid_value",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages[0].content",
        None,
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "x", "foo": 1}]},
        400,
        "messages[0].foo",
        "unknown_parameter",
    ),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "messages[0].role", "missing_required_parameter"),
    (CHAT, {"logprobs": 1}, 400, "logprobs", "invalid_value"),
    (CHAT, {"top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
    (CHAT, {"max_tokens": 3, "max_completion_tokens": 4}, 400, "max_completion_tokens", "invalid_value"),
    (CHAT, {"max_tokens": None, "max_completion_tokens": 0}, 400, "max_completion_tokens", "invalid_value"),
    (
        CHAT,
        {"max_tokens": None, "max_completion_tokens": 500},
        400,
        "max_completion_tokens",
        "context_length_exceeded",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "word " * 200}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (CHAT, {"echo": True}, 400, "echo", "unknown_parameter"),
    (CHAT, {"functions": []}, 400, "functions", "unknown_parameter"),
    # An engine without a grammar compiler (the fake one) refuses constraints instead of ignoring them.
    (CHAT, {"response_format": {"type": "json_object"}}, 400, "response_format", "unsupported"),
    (CHAT, {"stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    (CHAT, {"model": "other"}, 404, "model", "model_not_found"),
]


def _body(endpoint: str, change: dict) -> dict:
    body = dict(BASE[endpoint])
    for key, value in change.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


@pytest.mark.parametrize("endpoint", [CMPL, CHAT])
def test_valid_base_bodies_pass(client, endpoint):
    # The table below would pass vacuously if the base bodies were themselves rejected.
    assert client.post(endpoint, json=BASE[endpoint]).status_code == 200


@pytest.mark.parametrize(("endpoint", "change", "status", "param", "code"), CASES)
def test_rule(client, engine, endpoint, change, status, param, code):
    r = client.post(endpoint, json=_body(endpoint, change))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    assert param.split(".")[0].split("[")[0] in err["message"]
    assert engine.calls == []  # nothing reached the engine


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{bad json", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "invalid_type"),
        (b'"text"', "invalid_type"),
    ],
)
@pytest.mark.parametrize("endpoint", [CMPL, CHAT, "/tokenize", "/detokenize"])
def test_malformed_bodies(client, endpoint, raw, code):
    r = client.post(endpoint, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code


def test_boundary_values_are_accepted(client):
    # The inclusive edges of each range: a rule that is off by one fails here.
    body = {"model": "tiny", "prompt": [5] * 100, "max_tokens": 28, "temperature": 2, "top_p": 1, "n": 16,
            "presence_penalty": -2, "frequency_penalty": 2, "logprobs": 20, "seed": 2**63 - 1, "top_k": -1,
            "min_p": 1, "min_tokens": 28, "stop": ["x"] * 16}  # fmt: skip
    assert client.post(CMPL, json=body).status_code == 200, client.post(CMPL, json=body).text


def test_nulls_mean_not_given(client, engine):
    # vLLM's benchmark client sends "logprobs": null; OpenAI treats null as absent.
    body = {
        "model": "tiny",
        "prompt": "hi",
        "max_tokens": 2,
        "logprobs": None,
        "temperature": None,
        "stop": None,
    }
    assert client.post(CMPL, json=body).status_code == 200
    params = engine.calls[0][1]
    assert params.logprobs is None and params.temperature == 1.0 and params.stop == ()


def test_model_may_be_omitted_and_aliases_resolve(client):
    assert client.post(CMPL, json={"prompt": "hi", "max_tokens": 1}).json()["model"] == "tiny"
    assert (
        client.post(CMPL, json={"model": "alias", "prompt": "hi", "max_tokens": 1}).json()["model"] == "alias"
    )


def test_unknown_route_and_method_use_the_error_shape(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.get(CMPL)
    assert r.status_code == 405 and "error" in r.json()


def test_engine_crash_is_a_500_in_the_error_shape_without_traceback(client, engine):
    async def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")
        yield  # pragma: no cover

    engine.generate = broken
    r = client.post(CMPL, json=BASE[CMPL])
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert "secret" not in r.text and "Traceback" not in r.text
