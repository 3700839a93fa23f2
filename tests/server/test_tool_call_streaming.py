"""Tool calls streamed as they are generated (no model): for every parser and tool_choice mode, the
deltas of a text fed in pieces reassemble exactly to the whole response of the same text, whatever
the piece boundaries and wherever the text stops (finish_reason "length" at every prefix); calls open
with id, type and name, then their arguments arrive in deltas; content before a call is streamed
before the call opens and never carries a partial marker."""

from __future__ import annotations

import json
import random

import pytest

from qserve.serve.api.protocol import ToolDefinition
from qserve.serve.api.tools import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    ParsedCall,
    ToolPlan,
    ToolStreamer,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer"}}, "required": ["zone"]}}}  # fmt: skip
PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}


class _Req:
    def __init__(self, tool_choice="auto", parallel_tool_calls=None):
        self.tools = [ToolDefinition.model_validate(t) for t in (WEATHER, TIME)]
        self.tool_choice = tool_choice
        self.parallel_tool_calls = parallel_tool_calls


def plan_for(parser: str = "hermes", tool_choice="auto", parallel=None) -> ToolPlan:
    return ToolPlan.from_request(_Req(tool_choice, parallel), PARSERS[parser]())


def stream(plan: ToolPlan, text: str, finish_reason: str, cuts: list[int]):
    """(deltas, finish_reason) of `text` fed at the given cut points, then finished."""
    streamer, deltas = ToolStreamer(plan), []
    for end in cuts:
        part, reason = streamer.step(text[:end], None)
        assert reason is None
        deltas += part
    part, reason = streamer.step(text, finish_reason)
    return deltas + part, reason


def reassemble(deltas) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, [(name, arguments)]) as a client accumulates them; checks OpenAI's delta shape."""
    content, calls = None, []
    for d in deltas:
        if d.content is not None:
            assert d.content and not d.tool_calls
            content = (content or "") + d.content
        for tc in d.tool_calls or []:
            if tc.index == len(calls):  # a call opens: id, type and name first
                assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                calls.append([tc.function.name, tc.function.arguments or ""])
            else:
                assert tc.index == len(calls) - 1, "a call's arguments follow before the next call opens"
                assert tc.id is None and tc.function.name is None and tc.function.arguments
                calls[tc.index][1] += tc.function.arguments
    return content, [tuple(c) for c in calls]


def whole(plan: ToolPlan, text: str, finish_reason: str):
    content, calls, reason = plan.result(text, finish_reason)
    return content, [(c.function.name, c.function.arguments) for c in calls], reason


def assert_stream_equals_whole(plan: ToolPlan, text: str, finish_reason: str, cuts: list[int]) -> None:
    deltas, reason = stream(plan, text, finish_reason, cuts)
    content, calls = reassemble(deltas)
    want_content, want_calls, want_reason = whole(plan, text, finish_reason)
    assert (content, calls, reason) == ((want_content or None), want_calls, want_reason), text


HERMES = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"15e\\" {x}"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": -3}}\n</tool_call>'
)
LLAMA3 = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {"zone": 1}}'
MISTRAL = 'Sure.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lima"}}, {"name": "get_time", "arguments": {"zone": 2}}]'
REQUIRED = (
    '[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", "arguments": {"zone": 0}}]'
)
TEXTS = {"hermes": HERMES, "llama3_json": LLAMA3, "mistral": MISTRAL}


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_parallel_calls_and_content_reassemble_at_every_prefix(parser):
    plan, text = plan_for(parser), TEXTS[parser]
    content, calls, reason = whole(plan, text, "stop")
    assert [name for name, _ in calls] == ["get_weather", "get_time"] and reason == "tool_calls"
    assert all(isinstance(json.loads(args), dict) for _, args in calls)
    assert content == {"hermes": "Let me check.\n", "llama3_json": None, "mistral": "Sure."}[parser]
    for step in (1, 2, 5, 11):
        assert_stream_equals_whole(plan, text, "stop", list(range(step, len(text), step)))
    for end in range(len(text) + 1):  # cut short anywhere: the stream still equals the whole response
        assert_stream_equals_whole(plan, text[:end], "length", list(range(1, end)))


def test_required_and_named_reassemble_at_every_prefix():
    required = plan_for(tool_choice="required")
    content, calls, reason = whole(required, REQUIRED, "stop")
    assert content is None and [n for n, _ in calls] == ["get_weather", "get_time"] and reason == "tool_calls"
    named = plan_for(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for plan, text in ((required, REQUIRED), (named, '{"city": "Rome"}')):
        assert_stream_equals_whole(plan, text, "stop", list(range(1, len(text))))
        for end in range(len(text) + 1):
            assert_stream_equals_whole(plan, text[:end], "length", list(range(1, end)))


def test_arguments_stream_in_many_deltas_and_the_call_opens_before_them():
    long_city = "Llanfairpwllgwyngyll " * 10
    text = f'Checking.\n<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{long_city}"}}}}\n</tool_call>'
    deltas, reason = stream(plan_for(), text, "stop", list(range(4, len(text), 4)))
    kinds = ["content" if d.content else "head" if d.tool_calls[0].id else "args" for d in deltas]
    assert kinds[0] == "content" and kinds.index("head") < kinds.index("args")
    assert kinds.count("args") > 20 and reason == "tool_calls"
    head = deltas[kinds.index("head")].tool_calls[0]
    assert head.function.name == "get_weather" and head.function.arguments == ""
    assert "".join(d.content or "" for d in deltas) == "Checking.\n"  # no part of the marker leaks
    assert json.loads(reassemble(deltas)[1][0][1]) == {"city": long_city}


def test_content_is_streamed_before_the_call_and_partial_markers_are_held():
    plan = plan_for()
    streamer = ToolStreamer(plan)
    assert [d.content for d in streamer.step("Hello <tool_", None)[0]] == ["Hello "]
    assert streamer.step('Hello <tool_call>\n{"na', None)[0] == []
    (head,) = streamer.step('Hello <tool_call>\n{"name": "get_time", ', None)[0]
    assert head.tool_calls[0].function.name == "get_time"
    plain = "A < b and <tool is not a call"
    assert_stream_equals_whole(plan, plain, "stop", list(range(1, len(plain))))
    assert whole(plan, plain, "stop") == (plain, [], "stop")


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    [
        ("hermes", "x <tool_call>{oops", "x <tool_call>{oops", []),  # no name: not a call
        ("hermes", 'A <tool_call>{"x": 1}</tool_call> B <tool_call>{"name": "get_time", "arguments": {}}',
         'A <tool_call>{"x": 1}</tool_call> B ', [("get_time", "{}")]),
        ("hermes", 'Hi <tool_call>{"name": "f", "arguments": {</tool_call>', "Hi ", [("f", "{")]),
        ("hermes", '<tool_call>{"arguments": {"zone": 1}, "name": "get_time"}', None, [("get_time", '{"zone": 1}')]),
        ("hermes", '<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", "{}")]),
        ("llama3_json", '{"name": "f", "parameters": "{\\"a\\": [1]}"}', None, [("f", '{"a": [1]}')]),
        ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
        ("llama3_json", "  Plain answer.", "  Plain answer.", []),
        ("mistral", '[TOOL_CALLS]{"name": "f", "arguments": {"a": null}}', None, [("f", '{"a": null}')]),
        ("mistral", "[TOOL_CALLS][]", "[TOOL_CALLS][]", []),
    ],
)  # fmt: skip
def test_edge_cases_stream_like_the_whole_response(parser, text, content, calls):
    plan = plan_for(parser)
    got_content, got_calls, _ = whole(plan, text, "stop")
    assert (got_content, got_calls) == (content, calls)
    assert_stream_equals_whole(plan, text, "stop", list(range(1, len(text))))


def test_parallel_false_keeps_the_first_call():
    plan = plan_for(parallel=False)
    _, calls, _ = whole(plan, HERMES, "stop")
    assert [n for n, _ in calls] == ["get_weather"]
    assert_stream_equals_whole(plan, HERMES, "stop", list(range(1, len(HERMES))))


def _random_call(rng: random.Random, key: str) -> tuple[str, ParsedCall]:
    alphabet = 'ab "\\{}[]<>,:;\n\té€😀'
    value = {"s": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))),
             "n": rng.choice([0, -1.5, 1e9, True, None]), "l": [rng.randint(0, 9)] * rng.randint(0, 3)}  # fmt: skip
    args = json.dumps(
        value, ensure_ascii=rng.random() < 0.5, separators=rng.choice([(",", ":"), (", ", ": ")])
    )
    name = rng.choice(["get_weather", "get_time"])
    return json.dumps({"name": name, key: "@"}).replace('"@"', args), ParsedCall(name, args)


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_random_calls_at_random_cuts(parser):
    rng = random.Random(parser)
    key = "parameters" if parser == "llama3_json" else "arguments"
    for _ in range(60):
        made = [_random_call(rng, key) for _ in range(rng.randint(1, 3))]
        objects = [m[0] for m in made]
        prefix = "" if parser == "llama3_json" else rng.choice(["", "Sure, ", "a < b\n"])
        if parser == "hermes":
            body = "".join(f"<tool_call>\n{o}\n</tool_call>\n" for o in objects)
        elif parser == "llama3_json":
            body = "; ".join(objects)
        else:
            body = "[TOOL_CALLS][" + ", ".join(objects) + "]"
        text = prefix + body
        content, calls, _ = whole(plan_for(parser), text, "stop")
        assert calls == [(c.name, c.arguments) for _, c in made]
        assert content == (prefix or None)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 40))))
        assert_stream_equals_whole(plan_for(parser), text, "stop", cuts)
        end = rng.randint(0, len(text))
        assert_stream_equals_whole(plan_for(parser), text[:end], "length", [c for c in cuts if c < end])
