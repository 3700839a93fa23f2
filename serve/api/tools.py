"""Structured outputs and tool calling at the API: request fields -> grammar constraints, tool-call
parsers, and the assistant message (whole or streamed) built from a constrained or parsed output.

- `response_format` (`json_object`, `json_schema`) and vLLM's `structured_outputs` become one
  `StructuredOutputsParams`; a schema keyword the grammar engine cannot enforce is a 400 naming it.
- `tools` / `tool_choice`: `auto` lets the model answer freely and a parser (Hermes `<tool_call>`,
  Llama 3 JSON, Mistral `[TOOL_CALLS]`) extracts calls; `required` constrains the output to a JSON
  array of `{"name", "arguments"}` calls over the given functions; a named function constrains it to
  that function's parameter schema. So forced calls always parse. `none` renders the tools but neither
  constrains nor parses.
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


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


def _call_from(obj: Any) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            json.loads(args)
        except ValueError:
            return None
        return ParsedCall(obj["name"], args)
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    """Finds tool calls in generated text. `marker` starts the tool-call region (streaming holds the
    text from there until the end); `parse` returns (content before the calls, calls), or
    (whole text, []) when the region does not parse."""

    name = ""
    marker = ""

    def region_start(self, text: str) -> int | None:
        at = text.find(self.marker)
        return None if at < 0 else at

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        raise NotImplementedError


class HermesParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen 2/2.5/3, Hermes, SmolLM)."""

    name = "hermes"
    marker = "<tool_call>"
    _block = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        start = self.region_start(text)
        if start is None:
            return text, []
        calls = []
        for body in self._block.findall(text[start:]):
            try:
                call = _call_from(json.loads(body.strip()))
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return text[:start], calls


class Llama3JsonParser(ToolParser):
    """Llama 3.x: the reply is `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`),
    several separated by `;`."""

    name = "llama3_json"
    marker = "<|python_tag|>"

    def region_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith("{") or stripped.startswith(self.marker):
            return 0
        return None

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        if self.region_start(text) is None:
            return text, []
        body = text.strip().removeprefix(self.marker)
        decoder, calls, pos = json.JSONDecoder(), [], 0
        try:
            while pos < len(body):
                obj, end = decoder.raw_decode(body, pos)
                call = _call_from(obj)
                if call is None:
                    return text, []
                calls.append(call)
                pos = end
                while pos < len(body) and body[pos] in " \n\t;":
                    pos += 1
        except ValueError:
            return text, []
        return "", calls


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`."""

    name = "mistral"
    marker = "[TOOL_CALLS]"

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        start = self.region_start(text)
        if start is None:
            return text, []
        try:
            items = json.loads(text[start + len(self.marker) :].strip())
        except ValueError:
            return text, []
        items = items if isinstance(items, list) else [items]
        calls = [_call_from(item) for item in items]
        if not calls or any(c is None for c in calls):
            return text, []
        return text[:start], calls


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

    def result(
        self, text: str, finish_reason: str | None
    ) -> tuple[str | None, list[ToolCallOut], str | None]:
        """(content, tool calls, finish_reason) of a finished output."""
        calls: list[ParsedCall] = []
        content: str | None = text
        if self.mode == "named":
            calls, content = [ParsedCall(self.named, text)], None
        elif self.mode == "required" and finish_reason == "stop":
            try:
                calls = [c for c in (_call_from(o) for o in json.loads(text)) if c is not None]
            except (ValueError, TypeError):
                calls = []
            content = None if calls else text
        elif self.mode == "auto":
            content, calls = self.parser.parse(text)
            if not self.parallel:
                calls = calls[:1]
            if calls and not content.strip():
                content = None
        out = [
            ToolCallOut(id=_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in calls
        ]
        if out and finish_reason == "stop":
            finish_reason = "tool_calls"
        return content, out, finish_reason


class ToolStreamer:
    """Turns one choice's cumulative text into OpenAI deltas: content as it comes, tool calls as
    `tool_calls` deltas (a named call streams its arguments; other calls are sent whole once parsed).
    Reassembled, the deltas equal `ToolPlan.result` of the final text (call ids aside)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.sent = 0  # characters of text already sent as content or named-call arguments
        self.opened = False

    def step(self, text: str, finish_reason: str | None) -> tuple[list[Delta], str | None]:
        plan, finished = self.plan, finish_reason is not None
        if plan.mode == "named":
            deltas = []
            if not self.opened:
                self.opened = True
                head = ToolCallDelta(index=0, id=_call_id(), type="function",
                                     function=FunctionCallDelta(name=plan.named, arguments=""))  # fmt: skip
                deltas.append(Delta(tool_calls=[head]))
            if len(text) > self.sent:
                part = ToolCallDelta(index=0, function=FunctionCallDelta(arguments=text[self.sent :]))
                deltas.append(Delta(tool_calls=[part]))
                self.sent = len(text)
            return deltas, ("tool_calls" if finish_reason == "stop" else finish_reason)
        if plan.mode == "required":
            if not finished:
                return [], None
            return self._final(text, finish_reason)
        # auto: stream content up to the tool-call region, never a partial marker or whitespace alone
        start = plan.parser.region_start(text)
        if finished:
            return self._final(text, finish_reason)
        limit = start if start is not None else _safe_end(text, plan.parser.marker)
        if limit > self.sent and text[:limit].strip():
            delta = Delta(content=text[self.sent : limit])
            self.sent = limit
            return [delta], None
        return [], None

    def _final(self, text: str, finish_reason: str | None) -> tuple[list[Delta], str | None]:
        content, calls, reason = self.plan.result(text, finish_reason)
        deltas = []
        if content is not None and len(content) > self.sent:
            deltas.append(Delta(content=content[self.sent :]))
        for i, call in enumerate(calls):
            fn = FunctionCallDelta(name=call.function.name, arguments=call.function.arguments)
            deltas.append(
                Delta(tool_calls=[ToolCallDelta(index=i, id=call.id, type="function", function=fn)])
            )
        self.sent = len(text)
        return deltas, reason


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
