"""Hypothesis-generated request bodies: whatever arrives, the answer is never a 5xx, and every error
has OpenAI's shape. Bodies mix real field names with well-typed, wrong-typed and out-of-range values
so the fuzzing reaches past the first validation error."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qserve.serve.api.protocol import ChatCompletionRequest, CompletionRequest

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
small_ints = st.integers(-3, 140)
plausible = {
    "model": st.sampled_from(["tiny", "alias", "nope"]),
    "prompt": st.text(max_size=40)
    | st.lists(small_ints, max_size=150)
    | st.lists(st.lists(small_ints, max_size=5), max_size=3),
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "user", "assistant", "tool"]),
                "content": st.text(max_size=30),
            }
        ),
        max_size=3,
    ),
    "max_tokens": small_ints,
    "max_completion_tokens": small_ints,
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "n": st.integers(-1, 20),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=20),
    "logprobs": st.integers(-2, 25) | st.booleans(),
    "top_logprobs": st.integers(-2, 25),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "min_tokens": small_ints,
    "stop_token_ids": st.lists(st.integers(-5, 500), max_size=4),
    "echo": st.booleans(),
    "seed": st.integers(-5, 2**64),
}
OPTIONAL = sorted(
    (set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)) - {"prompt", "messages"}
)
REQUIRED = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}


def _value(draw, key: str):
    # Mostly plausible values (so bodies get past validation to the engine), sometimes anything.
    if key in plausible and draw(st.integers(0, 9)) < 8:
        return draw(plausible[key])
    return draw(json_values)


@st.composite
def bodies(draw, endpoint: str):
    body = {}
    if draw(st.integers(0, 9)) < 9:
        body[REQUIRED[endpoint]] = _value(draw, REQUIRED[endpoint])
    for key in draw(st.lists(st.sampled_from(OPTIONAL), max_size=4, unique=True)):
        body[key] = _value(draw, key)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=8))] = draw(json_values)  # an unknown (or duplicate) key
    return body


def _check(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
    else:
        assert response.json()["choices"]


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_5xx_for_any_body(client, endpoint, data):
    body = data.draw(bodies(endpoint))
    _check(
        client.post(
            endpoint, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"}
        )
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64))
def test_no_5xx_for_any_bytes(client, raw):
    _check(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}))
