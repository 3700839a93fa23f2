"""The FastAPI application: routes, middleware, error handlers and lifespan around one engine.

`create_app` takes any object with the AsyncLLMEngine interface (generate / abort / stats / tokenizer /
max_model_len / model_name / is_healthy / shutdown), so the tests drive it with a fake engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from qserve import __version__
from qserve.serve.api.config import DEFAULT_MAX_BODY_BYTES
from qserve.serve.api.errors import APIError, install_error_handlers
from qserve.serve.api.metrics import ServerMetrics
from qserve.serve.api.middleware import AccessLog, BearerAuth, BodyLimit, Draining, DrainState
from qserve.serve.api.protocol import request_field_names
from qserve.serve.api.serving import OpenAIServing
from qserve.serve.metrics import StatsLogger

log = logging.getLogger("qserve.serve.api")
stats_log = logging.getLogger("qserve.serve.stats")
DEFAULT_STATS_INTERVAL = 10.0  # seconds between stats lines, as vLLM's VLLM_LOG_STATS_INTERVAL


def create_app(
    engine,
    served_model_names: list[str],
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    chat_template: str | None = None,
    log_requests: bool = True,
    log_stats_interval: float | None = DEFAULT_STATS_INTERVAL,
    tool_call_parser: str | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving `engine` under `served_model_names` (the first is the default).

    `log_requests`: one access-log line per request; `log_stats_interval`: seconds between vLLM-style
    throughput/queue lines (None: none); `tool_call_parser`: how tool calls are read from the text
    (serve/api/tools.py; None: chosen from the chat template). Responses carry `x-request-id` either way."""
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    metrics = ServerMetrics(engine, served_model_names[0])
    serving = OpenAIServing(engine, served_model_names, metrics, chat_template, tool_call_parser)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        stats_task = (
            asyncio.create_task(_log_stats(engine, log_stats_interval)) if log_stats_interval else None
        )
        yield
        if stats_task is not None:
            stats_task.cancel()
        # uvicorn calls this after its graceful shutdown has let in-flight responses finish; the
        # engine then completes whatever it still holds before its loop stops (or aborts it, when the
        # drain was cut short: the grace period of `qserve serve --shutdown-timeout` ran out).
        await engine.shutdown(drain=not drain.cut_short)
        if drain.cut_short:
            log.warning(
                "engine stopped; the requests still running when the drain was cut short were aborted"
            )
        else:
            log.info("engine stopped after draining its requests")

    drain = DrainState()  # the server starts the drain on SIGTERM (serve/api/shutdown.py)
    app = FastAPI(title="qserve", version=__version__, lifespan=lifespan)
    app.state.drain = drain
    app.state.serving = serving
    app.state.metrics = metrics
    install_error_handlers(app, request_field_names())
    # Starlette wraps the last-added middleware outermost: auth rejects before the body is read.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(Draining, state=drain)
    app.add_middleware(AccessLog, enabled=log_requests)  # outermost: refused requests are logged too

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serving.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serving.chat(request)

    @app.get("/v1/models")
    async def models() -> Response:
        return await serving.models()

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await serving.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await serving.detokenize(request)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_healthy:
            return APIError(
                503, "The engine loop has stopped; restart the server.", code="engine_dead"
            ).response()
        return JSONResponse({})

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _log_stats(engine, interval: float) -> None:
    logger = StatsLogger()
    while True:
        await asyncio.sleep(interval)
        try:
            line = logger.line(engine.stats())
        except Exception:  # a stats failure must not end the server; say so once per interval
            stats_log.exception("could not read engine stats")
            continue
        if line:
            stats_log.info(line)
