"""The request handlers: parse, check against the model, run on the engine, answer.

Routes read the raw body themselves (after the size-limit middleware) and validate it with the strict
request models, so every malformed request takes the same path to a 400 naming its parameter.

Tokenization, chat templating and detokenization of whole prompts run on one tokenizer thread, never on
the event loop, so a long prompt cannot stall /health, streaming or other requests. One thread, not a
pool: a Hugging Face fast tokenizer is not safe to call from several threads at once ("Already
borrowed"), and requests are tokenized in arrival order as before, only off the loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from qserve.errors import QserveError
from qserve.serve.api.errors import APIError, bad_request, from_validation_error
from qserve.serve.api.generation import ClientDisconnected, Generation, engine_dead, engine_failure
from qserve.serve.api.metrics import ServerMetrics
from qserve.serve.api.prompts import COMPLETION_DEFAULT_MAX_TOKENS, PromptBuilder, PromptInput, utf8_len
from qserve.serve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    request_field_names,
)
from qserve.serve.api.responses import LogprobFormatter, ResponseMeta, chat_response, completion_response
from qserve.serve.api.streaming import chat_stream, completion_stream
from qserve.serve.api.tools import ToolPlan, capabilities, choose_parser, request_constraint
from qserve.serve.sequence import QueueFullError
from qserve.serve.structured import available as structured_available

# A client that has gone away is answered with nginx's "client closed request"; nobody reads it.
CLIENT_CLOSED = 499
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIServing:
    """Handlers for /v1/* and the vLLM tokenizer endpoints, bound to one engine."""

    def __init__(
        self,
        engine,
        served_model_names: list[str],
        metrics: ServerMetrics,
        chat_template: str | None = None,
        tool_call_parser: str | None = None,
    ) -> None:
        self.engine = engine
        self.names = list(served_model_names)
        self.metrics = metrics
        self.builder = PromptBuilder(engine.tokenizer, engine.max_model_len, chat_template)
        self.fmt = LogprobFormatter(engine.tokenizer)
        self.field_names = request_field_names()
        self.created = int(time.time())  # /v1/models: when this server started serving the model
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qserve-tokenizer")
        template = chat_template or getattr(engine.tokenizer, "chat_template", None)
        self.tool_parser = choose_parser(tool_call_parser, template if isinstance(template, str) else None)
        # The grammar compiler of the engine (serve/structured.py); None for engines without one.
        self.structured = getattr(getattr(engine, "engine", engine), "structured", None)

    async def off_loop(self, fn, *args):
        """Run `fn(*args)` on the tokenizer thread; its exceptions (APIError included) raise here."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    # ---- helpers ----------------------------------------------------------------------------

    def parse(self, cls: type[BaseModel], body: bytes):
        try:
            return cls.model_validate_json(body)
        except ValidationError as exc:
            raise from_validation_error(exc, self.field_names) from None

    def model_name(self, requested: str | None) -> str:
        if requested is None:
            return self.names[0]
        if requested not in self.names:
            raise APIError(
                404,
                f"The model '{requested}' does not exist on this server; it serves {self.names}. "
                "Use one of those names (GET /v1/models lists them).",
                param="model",
                code="model_not_found",
            )
        return requested

    async def _constrain(self, params, spec, param: str):
        """`params` with the grammar of `spec` compiled (on the tokenizer thread, never the engine loop)."""
        if spec is None:
            return params
        if self.structured is None:
            raise bad_request(
                f"'{param}' needs structured outputs, which this server's engine does not support.",
                param,
                "unsupported",
            )
        try:
            prepared = await self.off_loop(self.structured.prepare, spec)
            return replace(params, structured_outputs=prepared)
        except QserveError as exc:  # xgrammar is not installed
            raise bad_request(
                f"Structured outputs are unavailable on this server: {exc}.", param, "unsupported"
            ) from None
        except ValueError as exc:  # a regex / grammar that does not compile, or min_tokens / ignore_eos
            raise bad_request(f"Invalid value for '{param}': {exc}.", param) from None

    def _require_healthy(self) -> None:
        if not self.engine.is_healthy:
            raise engine_dead()

    async def _start(self, request: Request, prompts: list[PromptInput], params, request_id: str, param: str):
        tracks = [self.metrics.track(len(p.token_ids)) for p in prompts]
        gen = Generation(
            self.engine, [p.token_ids for p in prompts], params, request_id, request.receive, tracks
        )
        try:
            await gen.start()
        except QueueFullError as exc:
            raise APIError(
                429,
                f"The server is at capacity: {exc}. Retry after the delay in Retry-After.",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except QserveError as exc:  # the engine is shutting down or its loop died
            raise engine_failure(self.engine, exc) from None
        except ValueError as exc:  # the engine refuses a prompt that can never fit its KV cache
            raise bad_request(f"The engine refused the prompt: {exc}", param) from None
        return gen

    async def _collect(self, gen: Generation) -> list | None:
        """Every prompt's final output, or None when the client left (answered with CLIENT_CLOSED)."""
        try:
            return await gen.collect()
        except ClientDisconnected:
            return None
        except QserveError as exc:  # the engine died while generating
            raise engine_failure(self.engine, exc) from None
        finally:
            await gen.close()

    # ---- /v1 ----------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = self.parse(CompletionRequest, await request.body())
        model = self.model_name(req.model)
        self._require_healthy()
        prompts = await self.off_loop(self.builder.completion, req)
        max_tokens = self.builder.max_tokens(
            prompts, req.max_tokens, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS
        )
        params = self.builder.sampling_params(req, max_tokens, req.logprobs)
        params = await self._constrain(params, *request_constraint(req))
        meta = ResponseMeta.make("cmpl", model)
        n, echo = params.n, bool(req.echo)
        try:
            gen = await self._start(request, prompts, params, meta.id, "prompt")
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        if req.stream:
            body = completion_stream(gen, meta, prompts, n, echo, req.logprobs, req.include_usage, self.fmt)
            return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
        finals = await self._collect(gen)
        if finals is None:
            return Response(status_code=CLIENT_CLOSED)
        resp = completion_response(meta, prompts, finals, n, echo, req.logprobs, self.fmt)
        return JSONResponse(resp.model_dump())

    async def chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = self.parse(ChatCompletionRequest, await request.body())
        model = self.model_name(req.model)
        self._require_healthy()
        plan = ToolPlan.from_request(req, self.tool_parser)
        prompt = await self.off_loop(self.builder.chat, req)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.builder.max_tokens([prompt], req.output_limit, param, None)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self.builder.sampling_params(req, max_tokens, top)
        if plan is not None and plan.constraint is not None:
            params = await self._constrain(params, plan.constraint, "tool_choice")
        else:
            params = await self._constrain(params, *request_constraint(req))
        plan = plan if plan is not None and plan.parses else None
        if plan is not None and plan.parser.name == "mistral":  # its [TOOL_CALLS] marker is a special token
            params = replace(params, skip_special_tokens=False)
        meta = ResponseMeta.make("chatcmpl", model)
        try:
            gen = await self._start(request, [prompt], params, meta.id, "messages")
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        if req.stream:
            body = chat_stream(gen, meta, prompt, top, req.include_usage, self.fmt, plan)
            return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
        finals = await self._collect(gen)
        if finals is None:
            return Response(status_code=CLIENT_CLOSED)
        (final,) = finals
        return JSONResponse(chat_response(meta, prompt, final, top, self.fmt, plan).model_dump())

    async def models(self) -> JSONResponse:
        caps = capabilities(self.structured is not None and structured_available(), self.tool_parser)
        cards = [
            ModelCard(
                id=name,
                created=self.created,
                root=str(self.engine.model_name),
                max_model_len=self.engine.max_model_len,
                capabilities=caps,
            )
            for name in self.names
        ]
        return JSONResponse(ModelList(data=cards).model_dump())

    # ---- vLLM's tokenizer endpoints -----------------------------------------------------------

    async def tokenize(self, request: Request) -> JSONResponse:
        body = await request.body()
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request(f"Request body is not valid JSON: {exc}.", None, "invalid_json") from None
        chat = isinstance(raw, dict) and "messages" in raw
        req = self.parse(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)
        self.model_name(req.model)

        def tokenize() -> tuple[list[int], list[str] | None]:
            # Text that cannot fit the context is refused by size here too: it would hold the tokenizer
            # thread, and with it every request's tokenization, for seconds.
            if chat:
                self.builder.check_text_size(sum(utf8_len(m.text) for m in req.messages), "messages")
                text = self.builder.render_chat(req.messages, req.add_generation_prompt)
            else:
                self.builder.check_text_size(utf8_len(req.prompt), "prompt")
                text = req.prompt
            ids = self.engine.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
            return ids, self.engine.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None

        ids, strs = await self.off_loop(tokenize)
        return JSONResponse(
            {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids, "token_strs": strs}
        )

    async def detokenize(self, request: Request) -> JSONResponse:
        req: DetokenizeRequest = self.parse(DetokenizeRequest, await request.body())
        self.model_name(req.model)
        self.builder.check_ids(req.tokens, "tokens")
        return JSONResponse({"prompt": await self.off_loop(self.engine.tokenizer.decode, req.tokens)})
