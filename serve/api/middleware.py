"""ASGI middleware that runs before any body is parsed: bearer-token auth and the request-size limit.

Both are plain ASGI (not BaseHTTPMiddleware) so a rejected request is answered without reading its
body, and the size limit holds for chunked uploads that carry no Content-Length.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qserve.serve.api.errors import APIError

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
