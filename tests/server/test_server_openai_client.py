"""The official `openai` client against a live server (uvicorn on a free port) over the fake engine.

The fake engine's tokens are a known function of the request, so each test checks the exact text.
"""

from __future__ import annotations

import openai
import pytest
from server_testing import MODEL

from qserve.serve.sampling_params import SamplingParams


@pytest.fixture
def oai(live):
    url, engine = live
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30) as client:
        yield client, engine


def expected_text(
    engine, prompt_ids: list[int], max_tokens: int, sample: int = 0, seed: int | None = None
) -> str:
    params = SamplingParams(temperature=0.0 if seed is None else 1.0, seed=seed, max_tokens=max_tokens)
    ids = [engine.token(prompt_ids, params, sample, i) for i in range(max_tokens)]
    return engine.tokenizer.decode(ids)


def test_completion(oai, tokenizer):
    client, engine = oai
    r = client.completions.create(model=MODEL, prompt="The capital", max_tokens=5, temperature=0)
    ids = tokenizer.encode("The capital")
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.choices[0].text == expected_text(engine, ids, 5)
    assert r.choices[0].finish_reason == "length" and r.choices[0].index == 0
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids),
        5,
        len(ids) + 5,
    )


def test_batched_token_id_prompts(oai):
    client, engine = oai
    r = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt i, sample j -> i * n + j
    assert r.choices[3].text == expected_text(engine, [8, 9], 3, sample=1)
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12


def test_chat(oai, tokenizer):
    client, engine = oai
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=4, temperature=0)
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected_text(engine, list(ids), 4)
    assert r.usage.prompt_tokens == len(ids)
    assert engine.calls[0][0] == list(ids)  # the template's tokens, no extra BOS


def test_streaming_with_usage_matches_non_streaming(oai):
    client, engine = oai
    # With a token every 10 ms the server keeps up, so no outputs are coalesced: one chunk per token.
    engine.delay = 0.01
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Hello",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert len([c for c in chunks if c.choices]) == 6  # one chunk per token
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming(oai):
    client, _ = oai
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_n2(oai):
    client, _ = oai
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=6, temperature=0.8, seed=3
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 12


def test_stop_string(oai):
    client, _ = oai
    full = (
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0).choices[0].text
    )
    stop = full[5:7]
    cut = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0, stop=[stop])
    choice = cut.choices[0]
    assert choice.text == full[: full.find(stop)]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop  # vLLM's extra field


def test_completion_logprobs(oai):
    client, _ = oai
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(len(top) <= 2 and max(top.values()) == -0.5 for top in lp.top_logprobs)


def test_chat_logprobs(oai):
    client, _ = oai
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(t.top_logprobs) == 2 and t.logprob == -0.5 for t in content)
    assert [t.top_logprobs[0].logprob for t in content] == [-0.5] * 3
    assert bytes(content[0].bytes).decode() == content[0].token


def test_seed_reproducibility(oai):
    client, engine = oai

    def sample(seed):
        kw = dict(model=MODEL, prompt="Hello", max_tokens=8, temperature=1.0, seed=seed)
        return client.completions.create(**kw).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert engine.calls[0][1].seed == 7


def test_models_list(oai):
    client, _ = oai
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model" and models[0].model_extra["max_model_len"] == 128


def test_errors_map_to_client_exceptions(oai):
    client, _ = oai
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="x", temperature=5)
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as extra:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], logit_bias={"1": 2}
        )
    assert extra.value.param == "logit_bias"
