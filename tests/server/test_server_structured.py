"""Structured outputs and tool calling through the OpenAI API, on the real engine with a tiny random model.

The model's text is garbage, but the grammar makes it well-formed: JSON schemas validate, regexes and
choices match, forced tool calls parse. Schemas are bounded (maxLength, maxItems, bounded numbers) so
each generation reaches the grammar's end, which the tests assert (finish_reason) before validating.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field
from server_testing import MODEL, serve_in_thread

pytest.importorskip("xgrammar", reason="structured outputs need the 'structured' extra (xgrammar)")

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))  # tiny_checkpoints lives with the engine tests

from tiny_checkpoints import single_thread, varied_model  # noqa: F401  (autouse: one torch thread)

from qserve.serve.api.app import create_app
from qserve.serve.api.protocol import ChatMessage, ToolDefinition
from qserve.serve.api.tools import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    ParsedCall,
    choose_parser,
    conversation,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_person(value) -> None:
    assert isinstance(value, dict) and set(value) <= set(PERSON["properties"]), value
    assert isinstance(value["name"], str) and 1 <= len(value["name"]) <= 8
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
    assert all(t in "abc" for t in value.get("tags", [])) and len(value.get("tags", [])) <= 3
    assert -1 <= value.get("score", 0) <= 1


def check_weather(args: dict) -> None:
    assert set(args) == {"city", "unit"}, args
    assert isinstance(args["city"], str) and len(args["city"]) <= 10
    assert args["unit"] in ("celsius", "fahrenheit")


def check_time(args: dict) -> None:
    assert set(args) == {"zone"} and isinstance(args["zone"], int) and -12 <= args["zone"] <= 14


@pytest.fixture(scope="module", params=["in-process", "core-process"])
def engine(request, tmp_path_factory):
    """Every test runs against the step loop in a thread and against the engine-core process that
    `qserve serve` uses by default (grammars, masks and tool-call parsing across the ZeroMQ split)."""
    from qserve.serve.async_engine import AsyncLLMEngine
    from qserve.serve.engine_core import EngineCoreClient

    # The Hermes tool prompt is ~800 tokens of the tiny 384-token vocabulary: a longer context than 512.
    model_dir = varied_model(
        tmp_path_factory.mktemp("structured-server") / "m", "llama", max_position_embeddings=2048
    )
    if request.param == "in-process":
        yield AsyncLLMEngine(model=str(model_dir), max_model_len=2048, validate=False)
        return
    core = EngineCoreClient(model=str(model_dir), max_model_len=2048, validate=False, log_level="warning")
    yield core
    core.close()
    assert core.exitcode == 0 and core.death is None


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, [MODEL], log_stats_interval=None)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def chat(client, **body):
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 300, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---- response_format / structured_outputs ------------------------------------------------------------


def test_json_schema_response_format_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    body = chat(client, response_format=fmt, n=3, temperature=1.0, seed=11)
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop", choice
        check_person(json.loads(choice["message"]["content"]))


def test_completions_take_response_format_and_structured_outputs(client):
    pattern = r"[a-f]{3}-\d{2,3}"
    r = client.post("/v1/completions", json={"prompt": ["Hi", "0123"], "max_tokens": 50, "n": 2,
                                             "temperature": 1.0, "seed": 3,
                                             "structured_outputs": {"regex": pattern}})  # fmt: skip
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 4
    for c in r.json()["choices"]:
        assert c["finish_reason"] == "stop" and re.fullmatch(pattern, c["text"]), c
    choices = ["red", "green", 'a "quoted" blue']
    r = client.post("/v1/completions", json={"prompt": "Pick", "max_tokens": 50, "n": 4, "temperature": 1.0,
                                             "structured_outputs": {"choice": choices}})  # fmt: skip
    assert r.status_code == 200, r.text
    assert all(c["text"] in choices for c in r.json()["choices"])
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    r = client.post("/v1/completions", json={"prompt": "{", "max_tokens": 300, "response_format": fmt})
    assert r.status_code == 200, r.text
    check_person(json.loads(r.json()["choices"][0]["text"]))


def test_json_object_outputs_are_objects_when_finished(client):
    """json_object leaves strings unbounded: an output cut by max_tokens is skipped (checked in
    tests/serve/test_structured.py as a grammar-valid prefix); every finished one is a JSON object."""
    body = chat(client, response_format={"type": "json_object"}, n=6, temperature=1.0, seed=2)
    finished = [c for c in body["choices"] if c["finish_reason"] == "stop"]
    assert finished
    for c in finished:
        assert isinstance(json.loads(c["message"]["content"]), dict)


def test_streamed_structured_output_equals_the_whole_response(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    whole = chat(client, response_format=fmt, temperature=0.0)["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={"messages": USER, "max_tokens": 300,
                       "response_format": fmt, "temperature": 0.0, "stream": True}) as r:  # fmt: skip
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == whole
    check_person(json.loads(text))


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5}}}}}},
         "response_format.json_schema.schema", "multipleOf"),
        ({"structured_outputs": {"json": {"type": "array", "uniqueItems": True}}}, "structured_outputs.json",
         "uniqueItems"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"e": {"type": "string", "format": "email"}}}}}]},
         "tools[0].function.parameters", "format"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
         "structured_outputs", "not both"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "nope"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "response_format", "min_tokens"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400s_naming_the_parameter(client, body, param, needle):
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 8, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert needle in error["message"], error


# ---- tools ------------------------------------------------------------------------------------------


def test_named_tool_call_arguments_always_parse(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = chat(client, tools=[WEATHER, TIME], tool_choice=choice, n=4, temperature=1.0, seed=7)
    for c in body["choices"]:
        assert c["finish_reason"] == "tool_calls", c
        message = c["message"]
        assert message["content"] is None
        (call,) = message["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        check_weather(json.loads(call["function"]["arguments"]))


def test_required_tool_calls_name_given_functions_with_valid_arguments(client):
    """With parallel calls a random model may append calls until max_tokens: such a choice ends with
    "length" and its calls as far as they were generated (as OpenAI's do); every choice that finished
    is checked."""
    body = chat(client, tools=[WEATHER, TIME], tool_choice="required", n=4, temperature=1.0, seed=1)
    finished = [c for c in body["choices"] if c["finish_reason"] != "length"]
    assert finished
    for c in body["choices"]:
        if c["finish_reason"] == "length":
            assert c["message"]["content"] is None and c["message"]["tool_calls"]
    for c in finished:
        assert c["finish_reason"] == "tool_calls", c
        calls = c["message"]["tool_calls"]
        assert calls
        for call in calls:
            args = json.loads(call["function"]["arguments"])
            {"get_weather": check_weather, "get_time": check_time}[call["function"]["name"]](args)
    single = chat(client, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, n=3,
                  temperature=1.0, seed=4)  # fmt: skip
    assert all(len(c["message"]["tool_calls"]) == 1 for c in single["choices"])


def stream_events(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": USER, "max_tokens": 300, "stream": True, **body}) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def reassemble(events: list[dict]) -> tuple[str | None, list[dict], str, int]:
    """(content, calls, finish_reason, most argument deltas of one call) as an OpenAI client sums them."""
    content, calls, deltas, reason = None, {}, {}, None
    for e in events:
        (choice,) = e["choices"]
        delta = choice["delta"]
        if delta.get("content"):
            assert not calls, "content after a tool call opened"
            content = (content or "") + delta["content"]
        for d in delta.get("tool_calls", []):
            if d["index"] not in calls:  # opens with id, type and name
                assert d["id"].startswith("call_") and d["type"] == "function" and d["function"]["name"]
                assert d["index"] == len(calls)
                calls[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}, d
                deltas[d["index"]] = deltas.get(d["index"], 0) + 1
            calls[d["index"]]["arguments"] += d["function"].get("arguments", "")
        reason = choice["finish_reason"] or reason
    return content, [calls[i] for i in sorted(calls)], reason, max(deltas.values(), default=0)


def assert_stream_matches(client, request: dict) -> tuple[dict, int]:
    """Streams `request` and compares it with the whole response; returns that and the most argument
    deltas one call had."""
    whole = chat(client, **request)["choices"][0]
    content, calls, reason, most = reassemble(stream_events(client, request))
    expected = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in whole["message"].get("tool_calls") or []]  # fmt: skip
    assert (content, calls, reason) == (whole["message"]["content"], expected, whole["finish_reason"])
    return whole, most


def test_streamed_forced_tool_calls_reassemble_to_the_whole_response(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice, parallel in ((named, None), ("required", False), ("required", True)):
        for seed in (5, 6):
            request = {"tools": [WEATHER, TIME], "tool_choice": tool_choice, "temperature": 1.0, "seed": seed,
                       "parallel_tool_calls": parallel}  # fmt: skip
            whole, _ = assert_stream_matches(client, request)
            assert whole["message"]["tool_calls"], whole


LONG_CITY = "[a-z]{40,50}"
AUTO_OUTPUTS = {  # (regex forcing the output, content before the calls)
    "hermes": (r"Let me check\.\n<tool_call>\n\{\"name\": \"get_weather\", \"arguments\": \{\"city\": \""
               + LONG_CITY + r"\", \"unit\": \"celsius\"\}\}\n</tool_call>\n<tool_call>\n"
               r"\{\"name\": \"get_time\", \"arguments\": \{\"zone\": -?[1-9]\}\}\n</tool_call>", "Let me check.\n"),
    "llama3_json": (r"<\|python_tag\|>\{\"name\": \"get_weather\", \"parameters\": \{\"city\": \""
                    + LONG_CITY + r"\", \"unit\": \"celsius\"\}\}; \{\"name\": \"get_time\", "
                    r"\"parameters\": \{\"zone\": [0-9]\}\}", None),
    "mistral": (r"Sure\.\[TOOL_CALLS\]\[\{\"name\": \"get_weather\", \"arguments\": \{\"city\": \""
                + LONG_CITY + r"\", \"unit\": \"celsius\"\}\}, \{\"name\": \"get_time\", "
                r"\"arguments\": \{\"zone\": [0-9]\}\}\]", "Sure."),
}  # fmt: skip


@pytest.mark.parametrize("parser", sorted(AUTO_OUTPUTS))
def test_streamed_auto_tool_calls_reassemble_for_every_parser(engine, client, parser):
    """tool_choice auto with the output forced by a regex into each parser's format: content, then two
    calls; the long argument arrives in many deltas and the stream equals the whole response."""
    pattern, content = AUTO_OUTPUTS[parser]
    if parser != "hermes":  # no `with`: the app's lifespan would shut down the engine the tests share
        client = TestClient(create_app(engine, [MODEL], log_stats_interval=None, tool_call_parser=parser))
    request = {"tools": [WEATHER, TIME], "tool_choice": "auto", "temperature": 1.0, "seed": 3,
               "structured_outputs": {"regex": pattern}}  # fmt: skip
    whole, most = assert_stream_matches(client, request)
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == content
    weather, time_ = whole["message"]["tool_calls"]
    assert [weather["function"]["name"], time_["function"]["name"]] == ["get_weather", "get_time"]
    assert len(json.loads(weather["function"]["arguments"])["city"]) >= 40
    check_time(json.loads(time_["function"]["arguments"]))
    assert most > 5, "a long argument arrives in several deltas"


def test_auto_and_none_answer_in_text_and_render_the_tools(client, app):
    for tool_choice in ("auto", "none"):
        body = chat(client, tools=[WEATHER], tool_choice=tool_choice, max_tokens=6, temperature=0.0)
        message = body["choices"][0]["message"]
        assert isinstance(message["content"], str) and "tool_calls" not in message
    builder = app.state.serving.builder
    messages = [ChatMessage(role="user", content="hi")]
    text = builder.render_chat(messages, True, [ToolDefinition.model_validate(WEATHER)])
    assert (
        "<tools>" in text and '"get_weather"' in text
    )  # the tiny template knows no tools: Hermes system text


def test_tool_round_trip_history_is_rendered(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    first = chat(client, tools=[WEATHER], tool_choice=choice, temperature=0.0)["choices"][0]["message"]
    call = first["tool_calls"][0]
    history = [*USER, first, {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}]
    r = client.post("/v1/chat/completions", json={"messages": history, "tools": [WEATHER], "max_tokens": 5})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"messages": [*USER, {"role": "tool", "content": "x"}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages[1]" and "tool_call_id" in error["message"]


def test_models_report_capabilities(client):
    card = client.get("/v1/models").json()["data"][0]
    caps = card["capabilities"]
    assert caps["structured_outputs"]["available"] is True
    assert caps["structured_outputs"]["backend"].startswith("xgrammar")
    assert "json_schema" in caps["structured_outputs"]["response_format"]
    assert "multipleOf" in caps["structured_outputs"]["unsupported_json_schema_keywords"]
    assert caps["tool_calling"]["tool_call_parser"] == "hermes"
    assert "required" in caps["tool_calling"]["tool_choice"]


# ---- the official client against a live server ----------------------------------------------------


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=8)
    age: int = Field(ge=0, le=120)
    member: bool


def test_openai_client_parse_and_tool_round_trip(app):
    with serve_in_thread(app) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as oai:
        r = oai.chat.completions.parse(model=MODEL, messages=USER, response_format=Person, max_tokens=200,
                                       temperature=0.0)  # fmt: skip
        person = r.choices[0].message.parsed
        assert isinstance(person, Person), r.choices[0].message.content
        choice = {"type": "function", "function": {"name": "get_weather"}}
        r = oai.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], tool_choice=choice,
                                        max_tokens=200, temperature=0.0)  # fmt: skip
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        check_weather(json.loads(message.tool_calls[0].function.arguments))
        history = [
            *USER,
            message,
            {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "21C"},
        ]
        r = oai.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=4)
        assert isinstance(r.choices[0].message.content, str)
        with pytest.raises(openai.BadRequestError, match="multipleOf"):
            oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "multipleOf": 2}}})  # fmt: skip
        assert httpx.get(f"{url}/v1/models").status_code == 200
        # The client's streaming helper: content, then each call's arguments in deltas, then the calls.
        request = {"tools": [WEATHER, TIME], "tool_choice": "auto", "temperature": 1.0, "seed": 3,
                   "extra_body": {"structured_outputs": {"regex": AUTO_OUTPUTS["hermes"][0]}}}  # fmt: skip
        whole = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=300, **request)
        with oai.chat.completions.stream(model=MODEL, messages=USER, max_tokens=300, **request) as s:
            events = [e.type for e in s]
            final = s.get_final_completion()
        assert events.count("tool_calls.function.arguments.delta") > 10
        assert events.count("tool_calls.function.arguments.done") == 2 and "content.done" in events
        message = final.choices[0].message
        assert final.choices[0].finish_reason == "tool_calls" and message.content == "Let me check.\n"
        assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
            (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]  # fmt: skip


# ---- parsers and the streamer (no model) ------------------------------------------------------------


def test_hermes_parser():
    p = HermesParser()
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"zone": 1}}</tool_call>')  # fmt: skip
    content, calls = p.parse(text)
    assert content == "Let me check.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": 1})]  # fmt: skip
    assert p.parse('<tool_call>{"name": "f", "arguments": {}}') == (
        "",
        p.parse('<tool_call>{"name": "f"}')[1],
    )
    broken = 'Hi <tool_call>{"name": "f", "arguments": {</tool_call>'  # a named call keeps its arguments
    assert p.parse(broken) == ("Hi ", [ParsedCall("f", "{")])
    nameless = 'Hi <tool_call>{"arguments": {}}</tool_call>'
    assert p.parse(nameless) == (nameless, [])
    assert p.parse("no calls") == ("no calls", [])


def test_llama3_and_mistral_parsers():
    content, calls = Llama3JsonParser().parse(
        '{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}'
    )
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"x": 1}'), ("g", "{}")]
    assert Llama3JsonParser().parse("Plain answer.") == ("Plain answer.", [])
    content, calls = MistralParser().parse('ok[TOOL_CALLS][{"name": "f", "arguments": {"a": "b"}}]')
    assert content == "ok" and calls[0].name == "f" and json.loads(calls[0].arguments) == {"a": "b"}
    assert choose_parser(None, "{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert choose_parser(None, "<|python_tag|>").name == "llama3_json"
    assert choose_parser(None, None).name == "hermes" and choose_parser("mistral", None).name == "mistral"
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        choose_parser("nope", None)


# Streamed tool calls without a model: tests/server/test_tool_call_streaming.py.


def test_conversation_native_templates_get_tools_and_structured_calls():
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [ChatMessage.model_validate(m) for m in (
        {"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"})]  # fmt: skip
    tools = [ToolDefinition.model_validate(WEATHER)]
    conv, tool_dicts = conversation(messages, tools, native=True)
    assert tool_dicts[0]["function"]["name"] == "get_weather"
    assert conv[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert conv[2]["tool_call_id"] == "call_1"
    conv, tool_dicts = conversation(messages, tools, native=False)
    assert tool_dicts is None and conv[0]["role"] == "system" and "<tools>" in conv[0]["content"]
    assert conv[2]["content"].startswith("<tool_call>") and "<tool_response>" in conv[3]["content"]


def test_tool_call_parser_is_configurable(engine):
    from qserve.errors import ConfigError
    from qserve.serve.api.config import TOOL_CALL_PARSERS, ServeConfig
    from qserve.serve.api.tools import TOOL_PARSERS

    assert sorted(TOOL_CALL_PARSERS) == sorted(TOOL_PARSERS)
    assert ServeConfig(model="m", tool_call_parser="mistral").tool_call_parser == "mistral"
    with pytest.raises(ConfigError, match="tool_call_parser: expected one of hermes"):
        ServeConfig(model="m", tool_call_parser="qwen")
    # No `with`: the app's lifespan would shut down the engine the other tests share.
    c = TestClient(create_app(engine, [MODEL], log_stats_interval=None, tool_call_parser="llama3_json"))
    caps = c.get("/v1/models").json()["data"][0]["capabilities"]
    assert caps["tool_calling"]["tool_call_parser"] == "llama3_json"
