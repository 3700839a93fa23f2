"""ASGI middleware that runs before any body is parsed: request ids and the access log, the shutdown
drain (503 for new requests after SIGTERM), bearer-token auth and the request-size limit.

All are plain ASGI (not BaseHTTPMiddleware) so a rejected request is answered without reading its
body, the size limit holds for chunked uploads that carry no Content-Length, and a streamed response
is timed to its last chunk.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qserve.serve.api.errors import APIError

access_log = logging.getLogger("qserve.serve.access")
# A client's own X-Request-Id is echoed when it is a plain token; anything else gets a fresh id.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# Paths that need the key when one is configured; /health, /metrics, /version stay open for probes.
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


async def _reply(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
    await error.response()(scope, receive, send)


class BearerAuth:
    """Requires `Authorization: Bearer <key>` on protected paths, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self._key):
            error = APIError(
                401,
                "Missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key the "
                "server was started with (--api-key or QSERVE_API_KEY).",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await _reply(scope, receive, send, error)
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Buffers at most `max_bytes` of request body, answers 413 beyond it, then replays the body.

    After the replay, `receive` is the server's own, so routes still see `http.disconnect`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> APIError:
        return APIError(
            413,
            f"Request body is {size} bytes; the limit is {self.max_bytes} bytes. Send a shorter prompt or "
            "start the server with a larger --max-body-bytes.",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _reply(scope, receive, send, APIError(400, "Content-Length must be a decimal integer."))
                return
            if int(length) > self.max_bytes:
                await _reply(scope, receive, send, self._too_large(length.decode()))
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body; nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _reply(scope, receive, send, self._too_large(f"more than {self.max_bytes}"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class AccessLog:
    """Gives every HTTP request an id (the client's `X-Request-Id` when it sends a plain one, else a fresh
    one), returns it in the `x-request-id` response header, and, when `enabled`, logs one line per
    request after its last byte: client, method, path, status, latency in ms and the id.

    Outermost, so requests refused by auth (401), the size limit (413) and the router (404) are logged
    too. A request whose handler raised is logged as 500; one whose client left before any response,
    as 499 (nginx's "client closed request").
    """

    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _CLIENT_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status: int | None = None
        logged = False

        def log_line(code: int) -> None:
            nonlocal logged
            if logged or not self.enabled:
                return
            logged = True
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            query = scope.get("query_string", b"")
            path = scope["path"] + (f"?{query.decode('latin-1')}" if query else "")
            access_log.info(
                '%s "%s %s" %d %.1f ms request_id=%s',
                where, scope["method"], path, code, (time.perf_counter() - start) * 1000, request_id,
            )  # fmt: skip

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log_line(status or 500)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            log_line(500)
            raise
        finally:
            log_line(status if status is not None else 499)


class DrainState:
    """Shared by `Draining` (which counts requests) and the server (which starts the drain on SIGTERM
    and exits once nothing is in flight or the grace period is over)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self.deadline: float | None = None  # time.monotonic() by which in-flight requests must end
        self.cut_short = False  # the drain ended with requests still in flight (they are aborted)
        self.timeout = 0.0
        self.reason = ""

    def begin(self, timeout: float, reason: str = "shutdown") -> None:
        """Stop taking new requests; the in-flight ones have `timeout` seconds. Safe in a signal handler
        (attribute writes only)."""
        if not self.draining:
            self.timeout, self.reason = timeout, reason
            self.deadline = time.monotonic() + timeout
            self.draining = True


# Open while draining: Prometheus keeps scraping a replica until it is gone.
DRAIN_OPEN_PATHS = ("/metrics", "/version")


class Draining:
    """Counts the HTTP requests in flight; once `state.begin()` was called (the server got SIGTERM), every
    new request gets 503 with a JSON error, `/health` included (so the readiness probe fails and load
    balancers send traffic elsewhere), while the requests already in flight (streams included) go on."""

    def __init__(self, app: ASGIApp, state: DrainState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.state.draining and scope["path"] not in DRAIN_OPEN_PATHS:
            error = APIError(
                503,
                "The server is shutting down: it is finishing the requests it already has and takes no "
                "new ones. Send the request to another replica, or retry once this one has restarted.",
                code="server_shutting_down",
                headers={"Connection": "close", "Retry-After": "5"},
            )
            await _reply(scope, receive, send, error)
            return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1
