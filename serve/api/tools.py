"""Structured outputs and tool calling at the API: request fields -> grammar constraints, tool-call
parsers, and the assistant message (whole or streamed) built from a constrained or parsed output.

- `response_format` (`json_object`, `json_schema`) and vLLM's `structured_outputs` become one
  `StructuredOutputsParams`; a schema keyword the grammar engine cannot enforce is a 400 naming it.
- `tools` / `tool_choice`: `auto` lets the model answer freely and a parser (Hermes `<tool_call>`,
  Llama 3 JSON, Mistral `[TOOL_CALLS]`) extracts calls; `required` constrains the output to a JSON
  array of `{"name", "arguments"}` calls over the given functions; a named function constrains it to
  that function's parameter schema. So forced calls always parse. `none` renders the tools but neither
  constrains nor parses.
- Calls are read incrementally (`ToolCallExtractor`), so a stream sends each call as OpenAI does: a
  delta with its id, type and name once the name is generated, then the arguments as they come; the
  whole response reads the text the same way, so the two always agree.
- A chat template that knows tools (it mentions `tools`) renders them itself; for one that does not,
  the tools go into the system message in the Hermes format and earlier calls / results into the text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from qserve.serve.api.errors import bad_request
from qserve.serve.api.protocol import (
    ChatMessage,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    ToolCallDelta,
    ToolCallOut,
    ToolDefinition,
)
from qserve.serve.structured import StructuredOutputsParams, UnsupportedSchemaError, check_json_schema

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def _spec(param: str, **kwargs) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)
    except UnsupportedSchemaError as exc:
        raise bad_request(
            f"Invalid value for '{param}': {exc}.", param, "unsupported_schema_keyword"
        ) from None
    except ValueError as exc:
        raise bad_request(f"Invalid value for '{param}': {exc}.", param) from None


def request_constraint(req) -> tuple[StructuredOutputsParams | None, str | None]:
    """The constraint of `response_format` / `structured_outputs`, and the parameter it came from."""
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        return _spec("response_format", json_object=True), "response_format"
    if rf is not None and rf.type == "json_schema":
        param = "response_format.json_schema.schema"
        return _spec(param, json=rf.json_schema.schema_ or {}), param
    so = req.structured_outputs
    if so is None:
        return None, None
    if so.json_ is not None:
        return _spec("structured_outputs.json", json=so.json_), "structured_outputs.json"
    if so.json_object:
        return _spec("structured_outputs.json_object", json_object=True), "structured_outputs.json_object"
    for name in ("regex", "choice", "grammar"):
        value = getattr(so, name)
        if value is not None:
            return _spec(f"structured_outputs.{name}", **{name: value}), f"structured_outputs.{name}"
    return None, None


# ---- parsers --------------------------------------------------------------------------------------
#
# Tool calls are read incrementally, so a stream can send each call as it is generated: the call opens
# (id, type, name) once its name is complete, and its arguments follow as the model writes them. A
# whole response is read by the same machinery in one go, so a stream reassembles exactly to it.
#
# `arguments` is the JSON text of the call's "arguments" (Llama 3: "parameters") value exactly as the
# model wrote it (a JSON string value is decoded: some models write the arguments object as a string).
# Like OpenAI's, arguments are not validated: a call cut short by max_tokens (finish_reason "length")
# or broken off by a malformed character keeps the arguments written so far. Before a call has a name
# nothing is committed: a region that does not parse as a call is returned as content.

_WS = " \t\n\r"
_STRING_STOP = re.compile(r'["\\]')
_SCALAR_CHARS = frozenset("-+.0123456789eEtruefalsn")  # numbers, true, false, null
_CONTAINER_CHARS = _SCALAR_CHARS | frozenset(_WS + ",:")
_CLOSERS = {"}": "{", "]": "["}
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text as generated


class _CallScanner:
    """Reads one call object `{"name": ..., "arguments": ...}` starting at `text[start] == "{"`, a
    character at a time as text arrives (`feed` resumes where the previous call stopped).

    `phase`: key | colon | value | after (between members) | done | failed. Values other than the
    name and the arguments are skipped; nested values are checked for bracket balance and characters
    only (a stray `<` outside a string fails the object)."""

    def __init__(self, start: int) -> None:
        self.pos = start + 1  # next character to read
        self.phase = "key"
        self.key: str | None = None
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None
        self.args_decoded: str | None = None  # the arguments written as a JSON string, once complete
        self.end: int | None = None  # index after the closing brace
        self._item: str | None = None  # key | string | container | scalar being read
        self._item_start = 0
        self._stack: list[str] = []
        self._in_string = False
        self._escape = False

    @property
    def committed(self) -> bool:
        return self.name is not None

    def arguments(self, text: str) -> str:
        """The arguments read so far (final once the object is done or failed)."""
        if self.args_start is None:
            return "{}" if self.phase == "done" else ""
        if text[self.args_start] == '"':
            return self.args_decoded or ""
        return text[self.args_start : self.pos if self.args_end is None else self.args_end]

    def feed(self, text: str) -> None:
        i, n = self.pos, len(text)
        while i < n and self.phase not in ("done", "failed"):
            if self._item is not None:
                i = self._continue_item(text, i)
                continue
            ch = text[i]
            if ch in _WS:
                i += 1
            elif self.phase == "key" and ch == '"':
                self._begin("key", i)
                i += 1
            elif self.phase in ("key", "after") and ch == "}":
                self.phase, self.end = "done", i + 1
                i += 1
            elif self.phase == "colon" and ch == ":":
                self.phase = "value"
                i += 1
            elif self.phase == "after" and ch == ",":
                self.phase = "key"
                i += 1
            elif self.phase == "value" and (ch in '"{[' or ch in _SCALAR_CHARS):
                kind = "string" if ch == '"' else "container" if ch in "{[" else "scalar"
                if self.key == "name" and kind != "string":
                    self.phase = "failed"
                    break
                if self.key in _ARGUMENT_KEYS and self.args_start is None:
                    self.args_start = i
                self._begin(kind, i)
                self._stack = [ch] if kind == "container" else []
                i += 1
            else:
                self.phase = "failed"
        self.pos = i

    def _begin(self, kind: str, at: int) -> None:
        self._item, self._item_start, self._in_string, self._escape = kind, at, False, False

    def _scan_string(self, text: str, i: int) -> int | None:
        """Index after the closing quote of the string under way, or None if it is not closed yet."""
        if self._escape:
            if i >= len(text):
                return None
            i, self._escape = i + 1, False
        while (m := _STRING_STOP.search(text, i)) is not None:
            at = m.start()
            if text[at] == '"':
                return at + 1
            if at + 1 >= len(text):
                self._escape = True
                return None
            i = at + 2
        return None

    def _continue_item(self, text: str, i: int) -> int:
        n, kind = len(text), self._item
        if kind in ("key", "string"):
            end = self._scan_string(text, i)
            if end is None:
                return n
            self._end_item(text, end)
            return end
        if kind == "scalar":
            while i < n and text[i] in _SCALAR_CHARS:
                i += 1
            if i < n:
                self._end_item(text, i)
            return i
        while i < n:  # container
            if self._in_string:
                end = self._scan_string(text, i)
                if end is None:
                    return n
                self._in_string, i = False, end
                continue
            ch = text[i]
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._stack.append(ch)
            elif ch in _CLOSERS:
                if self._stack[-1] != _CLOSERS[ch]:
                    self._item, self.phase = None, "failed"
                    return i
                self._stack.pop()
                if not self._stack:
                    self._end_item(text, i + 1)
                    return i + 1
            elif ch not in _CONTAINER_CHARS:
                self._item, self.phase = None, "failed"
                return i
            i += 1
        return n

    def _end_item(self, text: str, end: int) -> None:
        kind, raw = self._item, text[self._item_start : end]
        self._item = None
        try:
            value = json.loads(raw) if kind != "container" else None
        except ValueError:
            self.phase = "failed"
            return
        if kind == "key":
            self.key, self.phase = value, "colon"
            return
        self.phase = "after"
        if self.key == "name" and self.name is None:
            self.name = value
        if self._item_start == self.args_start:
            self.args_end = end
            if kind == "string":
                self.args_decoded = value


def _skip(text: str, i: int, chars: str = _WS) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _literal(text: str, i: int, literal: str) -> tuple[str, int]:
    """("ok", index after it) if `literal` is at i, ("wait", i) if the text ends in a prefix of it."""
    if text.startswith(literal, i):
        return "ok", i + len(literal)
    if literal.startswith(text[i:]):
        return "wait", i
    return "no", i


def _object_at(text: str, i: int, otherwise: str) -> tuple[str, int]:
    """("call", i) if a call object starts at i, ("wait", i) at the end of the text, else `otherwise`."""
    if i >= len(text):
        return "wait", i
    return ("call", i) if text[i] == "{" else (otherwise, i)


class ToolParser:
    """The text around tool calls of one model family. `find_region` locates where the calls begin
    (content stops there); `opening` and `between` read what precedes the first / each later call
    object and return ("call", index of its "{"), ("wait", _) for more text, or ("fail" | "stop", _)."""

    name = ""
    marker = ""

    def find_region(self, text: str, start: int) -> tuple[int | None, int, int]:
        """(index of the region or None, where its first call's opening starts, how much text is
        content for sure when there is no region: a partial marker at the end is held back)."""
        at = text.find(self.marker, start)
        if at >= 0:
            return at, at + len(self.marker), at
        return None, 0, _safe_end(text, self.marker)

    def opening(self, text: str, i: int, state: ToolCallExtractor) -> tuple[str, int]:
        return _object_at(text, _skip(text, i), "fail")

    def between(self, text: str, i: int, state: ToolCallExtractor) -> tuple[str, int]:
        return "stop", i

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        """(content before the calls, calls) of a whole text; (text, []) when it has no call."""
        extractor = ToolCallExtractor(self)
        extractor.feed(text)
        content, calls = extractor.result(text)
        return content or "", calls


class HermesParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen 2/2.5/3, Hermes, SmolLM)."""

    name = "hermes"
    marker = "<tool_call>"

    def between(self, text: str, i: int, state: ToolCallExtractor) -> tuple[str, int]:
        what, i = _literal(text, _skip(text, i), "</tool_call>")
        if what != "no":  # a missing end tag is tolerated
            if what == "wait":
                return what, i
            i = _skip(text, i)
        what, i = _literal(text, i, self.marker)
        if what != "ok":
            return ("wait" if what == "wait" else "stop"), i
        return _object_at(text, _skip(text, i), "stop")


class Llama3JsonParser(ToolParser):
    """Llama 3.x: the reply is `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`),
    several separated by `;`."""

    name = "llama3_json"
    marker = "<|python_tag|>"

    def find_region(self, text: str, start: int) -> tuple[int | None, int, int]:
        if start > 0:  # the reply did not open with a call: it is all content
            return None, 0, len(text)
        i = _skip(text, 0)
        if i == len(text):
            return None, 0, 0
        if text[i] == "{":
            return 0, i, 0
        what, after = _literal(text, i, self.marker)
        if what == "ok":
            return 0, after, 0
        return None, 0, (0 if what == "wait" else len(text))

    def between(self, text: str, i: int, state: ToolCallExtractor) -> tuple[str, int]:
        return _object_at(text, _skip(text, i, _WS + ";"), "stop")


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (or one object without the list)."""

    name = "mistral"
    marker = "[TOOL_CALLS]"

    def opening(self, text: str, i: int, state: ToolCallExtractor) -> tuple[str, int]:
        i = _skip(text, i)
        state.in_list = i < len(text) and text[i] == "["
        if state.in_list:
            i = _skip(text, i + 1)
        return _object_at(text, i, "fail")

    def between(self, text: str, i: int, state: ToolCallExtractor) -> tuple[str, int]:
        if not state.in_list:
            return "stop", i
        i = _skip(text, i)
        if i < len(text) and text[i] == ",":
            return _object_at(text, _skip(text, i + 1), "stop")
        return ("wait", i) if i >= len(text) else ("stop", i)


class _RequiredCalls(MistralParser):
    """tool_choice "required": the grammar makes the whole output `[{"name": ..., "arguments": ...}, ...]`."""

    name = "required"

    def find_region(self, text: str, start: int) -> tuple[int | None, int, int]:
        return (0, 0, 0) if start == 0 else (None, 0, 0)  # content only if no call could be read

    def opening(self, text: str, i: int, state: ToolCallExtractor) -> tuple[str, int]:
        i = _skip(text, i)
        if i >= len(text):
            return "wait", i
        if text[i] != "[":
            return "fail", i
        state.in_list = True
        return _object_at(text, _skip(text, i + 1), "fail")


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)
}


def choose_parser(name: str | None, template: str | None) -> ToolParser:
    """`name` (--tool-call-parser), else the family the chat template's text points to, else Hermes."""
    if name is not None:
        if name not in TOOL_PARSERS:
            raise ValueError(f"unknown tool-call parser {name!r}; choose one of {sorted(TOOL_PARSERS)}")
        return TOOL_PARSERS[name]()
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return MistralParser()
    if "<|python_tag|>" in text or "ipython" in text:
        return Llama3JsonParser()
    return HermesParser()


class ToolCallExtractor:
    """Content and tool calls of one choice's cumulative text, read as the text grows (`feed` with each
    longer text; the text only ever grows). `calls` are the committed calls (a name is known);
    `content_limit` is how much text is content for sure; `result` reads the final state.

    Phases: content (looking for the parser's region), opening (before the first call object), call
    (inside one), between (after one), stopped. A region that fails before any call is committed is
    content, and the search for a region goes on after it."""

    def __init__(self, parser: ToolParser, parallel: bool = True) -> None:
        self.parser = parser
        self.parallel = parallel
        self.calls: list[_CallScanner] = []
        self.in_list = False  # Mistral / required: the calls are in a JSON list
        self.phase = "content"
        self.search_from = 0
        self.region: int | None = None  # start of the region being read
        self.content_end: int | None = None  # start of the region of the first committed call
        self.safe = 0  # content phase: text that cannot start a region
        self.cursor = 0
        self.scanner: _CallScanner | None = None

    def feed(self, text: str) -> None:
        while True:
            if self.phase == "content":
                region, opening_at, safe = self.parser.find_region(text, self.search_from)
                if region is None:
                    self.safe = safe
                    self.search_from = max(self.search_from, safe)  # no region starts before `safe`
                    return
                self.region, self.cursor, self.phase = region, opening_at, "opening"
            if self.phase in ("opening", "between"):
                reader = self.parser.opening if self.phase == "opening" else self.parser.between
                what, at = reader(text, self.cursor, self)
                if what == "wait":
                    return
                if what != "call":
                    if self.phase == "opening":
                        self._region_failed()
                        continue
                    self.phase = "stopped"
                    return
                self.scanner, self.phase = _CallScanner(at), "call"
            if self.phase == "call":
                scanner = self.scanner
                scanner.feed(text)
                if scanner.committed and (not self.calls or self.calls[-1] is not scanner):
                    self.calls.append(scanner)
                    if self.content_end is None:
                        self.content_end = self.region
                if scanner.phase == "done" and scanner.committed:
                    self.cursor = scanner.end
                    self.phase = "between" if self.parallel else "stopped"
                    continue
                if scanner.phase in ("done", "failed"):  # uncommitted: not a call
                    if self.calls:
                        self.phase = "stopped"
                    else:
                        self._region_failed()
                        continue
                return
            return  # stopped

    def _region_failed(self) -> None:
        self.phase, self.search_from, self.scanner = "content", self.region + 1, None

    def content_limit(self) -> int:
        """Characters of the text that are content whatever follows (may end in whitespace)."""
        if self.content_end is not None:
            return self.content_end
        return self.safe if self.phase == "content" else self.region

    def result(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of `text` as final: content None when calls follow only whitespace."""
        if not self.calls:
            return text, []
        calls = [ParsedCall(c.name, c.arguments(text)) for c in self.calls]
        content = text[: self.content_end]
        return (content if content.strip() else None), calls


# ---- the plan of one chat request -----------------------------------------------------------------


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[ToolDefinition]
    parser: ToolParser
    parallel: bool = True
    named: str | None = None
    constraint: StructuredOutputsParams | None = field(default=None)

    @classmethod
    def from_request(cls, req, parser: ToolParser) -> ToolPlan | None:
        """None without tools; checks every function's parameter schema (a 400 naming the keyword)."""
        if not req.tools:
            return None
        for i, tool in enumerate(req.tools):
            if tool.function.parameters is not None:
                param = f"tools[{i}].function.parameters"
                try:
                    check_json_schema(tool.function.parameters)
                except UnsupportedSchemaError as exc:
                    raise bad_request(
                        f"Invalid value for '{param}': {exc}.", param, "unsupported_schema_keyword"
                    ) from None
                except ValueError as exc:
                    raise bad_request(f"Invalid value for '{param}': {exc}.", param) from None
        choice = req.tool_choice
        parallel = req.parallel_tool_calls is not False
        if isinstance(choice, NamedToolChoice):
            plan = cls("named", list(req.tools), parser, parallel, choice.function.name)
        else:
            plan = cls(choice or "auto", list(req.tools), parser, parallel)
        plan.constraint = plan._constraint()
        return plan

    def _parameters(self, tool: ToolDefinition) -> dict:
        return tool.function.parameters if tool.function.parameters is not None else NO_ARGUMENTS

    def _constraint(self) -> StructuredOutputsParams | None:
        if self.mode == "named":
            (tool,) = [t for t in self.tools if t.function.name == self.named]
            return _spec("tool_choice", json=self._parameters(tool))
        if self.mode == "required":
            calls = [
                {"type": "object", "properties": {"name": {"const": t.function.name},
                 "arguments": self._parameters(t)}, "required": ["name", "arguments"],
                 "additionalProperties": False}
                for t in self.tools
            ]  # fmt: skip
            schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
            if not self.parallel:
                schema["maxItems"] = 1
            return _spec("tool_choice", json=schema)
        return None

    @property
    def parses(self) -> bool:
        return self.mode != "none"

    def extractor(self) -> ToolCallExtractor | None:
        """The reader of this plan's output (None for a named call: the whole output is its arguments)."""
        if self.mode == "named":
            return None
        parser = _RequiredCalls() if self.mode == "required" else self.parser
        return ToolCallExtractor(parser, self.parallel)

    def result(
        self, text: str, finish_reason: str | None
    ) -> tuple[str | None, list[ToolCallOut], str | None]:
        """(content, tool calls, finish_reason) of a finished output."""
        extractor = self.extractor()
        if extractor is None:
            content, calls = None, [ParsedCall(self.named, text)]
        else:
            extractor.feed(text)
            content, calls = extractor.result(text)
        out = [
            ToolCallOut(id=_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in calls
        ]
        return content, out, _finish(finish_reason, bool(out))


def _finish(finish_reason: str | None, calls: bool) -> str | None:
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


class ToolStreamer:
    """Turns one choice's cumulative text into OpenAI deltas as it grows: content as soon as it cannot
    be the start of a tool call, then each call opened by a delta with its id, type, name and the
    arguments so far, and followed by deltas of the arguments as they are generated (calls numbered
    0, 1, ... by `index`). Reassembled, the deltas equal `ToolPlan.result` of the final text (call ids
    aside): both read the text with the same `ToolCallExtractor`."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.extractor = plan.extractor()
        self.content_sent = 0  # characters of content sent
        self.args_sent: list[int] = []  # characters of each opened call's arguments sent

    def step(self, text: str, finish_reason: str | None) -> tuple[list[Delta], str | None]:
        finished = finish_reason is not None
        if self.extractor is None:  # named: the output is the arguments
            calls, content = [ParsedCall(self.plan.named, text)], ""
        else:
            self.extractor.feed(text)
            if finished:
                content, calls = self.extractor.result(text)
                content = content or ""
            else:
                calls = [ParsedCall(c.name, c.arguments(text)) for c in self.extractor.calls]
                content = text[: self.extractor.content_limit()]
                if self.plan.mode == "required" or not content.strip():
                    content = ""  # whitespace alone waits: it is dropped if calls follow
        deltas = []
        if len(content) > self.content_sent:
            deltas.append(Delta(content=content[self.content_sent :]))
            self.content_sent = len(content)
        for index, call in enumerate(calls):
            if index == len(self.args_sent):
                fn = FunctionCallDelta(name=call.name, arguments=call.arguments)
                head = ToolCallDelta(index=index, id=_call_id(), type="function", function=fn)
                deltas.append(Delta(tool_calls=[head]))
                self.args_sent.append(len(call.arguments))
            elif len(call.arguments) > self.args_sent[index]:
                fn = FunctionCallDelta(arguments=call.arguments[self.args_sent[index] :])
                deltas.append(Delta(tool_calls=[ToolCallDelta(index=index, function=fn)]))
                self.args_sent[index] = len(call.arguments)
        return deltas, _finish(finish_reason, bool(calls))


def _safe_end(text: str, marker: str) -> int:
    """Length of `text` that cannot be the start of `marker` (a partial marker is held back)."""
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


# ---- rendering ------------------------------------------------------------------------------------


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def hermes_system_prompt(tools: list[ToolDefinition]) -> str:
    signatures = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{signatures}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def conversation(
    messages: list[ChatMessage], tools: list[ToolDefinition] | None, native: bool
) -> tuple[list[dict], list[dict] | None]:
    """(messages for apply_chat_template, its `tools` argument). `native`: the template renders tools
    and tool calls itself; otherwise they are written into the text in the Hermes format."""
    conv: list[dict] = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.text}
        if m.tool_calls:
            if native:
                entry["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.function.name, "arguments": _arguments_value(c.function.arguments)}}
                    for c in m.tool_calls
                ]  # fmt: skip
            else:
                blocks = [
                    "<tool_call>\n" + json.dumps({"name": c.function.name,
                                                   "arguments": _arguments_value(c.function.arguments)},
                                                  ensure_ascii=False) + "\n</tool_call>"
                    for c in m.tool_calls
                ]  # fmt: skip
                entry["content"] = "\n".join([entry["content"], *blocks] if entry["content"] else blocks)
        if m.role == "tool":
            if native:
                entry["tool_call_id"] = m.tool_call_id
                if m.name:
                    entry["name"] = m.name
            else:
                entry["content"] = f"<tool_response>\n{m.text}\n</tool_response>"
        conv.append(entry)
    if not tools:
        return conv, None
    if native:
        return conv, [t.model_dump(exclude_none=True) for t in tools]
    prompt = hermes_system_prompt(tools)
    if conv and conv[0]["role"] == "system":
        conv[0] = {**conv[0], "content": conv[0]["content"] + "\n\n" + prompt}
    else:
        conv.insert(0, {"role": "system", "content": prompt})
    return conv, None


def capabilities(structured_available: bool, parser: ToolParser) -> dict[str, Any]:
    """What /v1/models reports: which structured-output and tool-calling features this server serves."""
    from qserve.serve import structured

    backend = None
    if structured_available:
        from importlib.metadata import version

        backend = f"xgrammar {version('xgrammar')}"
    return {
        "structured_outputs": {
            "available": structured_available,
            "backend": backend,
            "response_format": ["text", "json_object", "json_schema"] if structured_available else ["text"],
            "structured_outputs": ["json", "json_object", "regex", "choice", "grammar"]
            if structured_available
            else [],
            "unsupported_json_schema_keywords": sorted(structured.UNSUPPORTED_KEYWORDS),
            "json_schema_formats": sorted(structured.SUPPORTED_FORMATS),
        },
        "tool_calling": {
            "tool_choice": ["none", "auto", "required", "function"]
            if structured_available
            else ["none", "auto"],
            "tool_call_parser": parser.name,
            "tool_call_parsers": sorted(TOOL_PARSERS),
            "parallel_tool_calls": True,
            "streaming": True,
        },
    }
