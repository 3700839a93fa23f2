"""Every error the API returns, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The official client maps the HTTP status to its exception class (400 -> BadRequestError, 401 ->
AuthenticationError, 404 -> NotFoundError, 429 -> RateLimitError) and shows `message`, so the message
names the parameter, what was expected and what was found. No handler ever returns a traceback.
"""

from __future__ import annotations

import difflib
import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qserve.serve.api.protocol import InvalidParam

log = logging.getLogger("qserve.serve.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error response; raise it anywhere under a route and the handler renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(
                    self.status, "server_error" if self.status >= 500 else "invalid_request_error"
                ),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _param_path(loc: tuple, field_names: frozenset[str]) -> str | None:
    # Union branches appear in pydantic locs as type tags ('list[str]', 'TextPart'); keep only field
    # names and list indices so `param` reads `messages[1].role`.
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in field_names:
            path += f".{part}" if path else part
    return path or None


def _shorten(value: object, limit: int = 80) -> str:
    text = (
        json.dumps(value)
        if isinstance(value, (str, int, float, bool, list, dict, type(None)))
        else repr(value)
    )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def from_validation_error(
    exc: ValidationError | RequestValidationError, field_names: frozenset[str]
) -> APIError:
    """The first pydantic error as a 400 naming the parameter, the rule and the value found."""
    first = exc.errors()[0]
    loc = tuple(p for p in first.get("loc", ()) if p != "body")
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidParam):
        return bad_request(f"Invalid value for '{cause.param}': {cause}.", cause.param)
    kind = first.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"Request body is not valid JSON: {first.get('msg')}.", None, "invalid_json")
    if kind.endswith("_type") and not loc:
        return bad_request("Request body must be a JSON object.", None, "invalid_type")
    param = _param_path(loc, field_names)
    if kind == "extra_forbidden":
        # The unknown key is by definition not a field name: append it to its parent's path.
        parent = _param_path(loc[:-1], field_names)
        param = f"{parent}.{loc[-1]}" if parent else str(loc[-1])
        hint = _did_you_mean(str(loc[-1]), field_names)
        return bad_request(
            f"Unknown parameter '{param}'.{hint} qserve rejects fields it does not implement rather than ignore "
            "them; remove it from the request.",
            param,
            "unknown_parameter",
        )
    if kind == "missing":
        return bad_request(f"Missing required parameter '{param}'.", param, "missing_required_parameter")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    found = _shorten(first.get("input"))
    return bad_request(f"Invalid value for '{param}': {msg} (got {found}).", param)


def _did_you_mean(name: str, field_names: frozenset[str]) -> str:
    """` Did you mean 'max_tokens'?` for a near miss of a known field name, else an empty string."""
    if name in field_names:  # a field of another request type ('messages' sent to /v1/completions)
        return " That parameter belongs to another endpoint's request."
    lowered = {f.lower(): f for f in field_names}
    if name.lower() in lowered:  # a case slip: MaxTokens, Max_Tokens
        return f" Did you mean '{lowered[name.lower()]}'?"
    normalised = name.lower().replace("-", "_")
    close = difflib.get_close_matches(normalised, sorted(field_names), n=1, cutoff=0.75)
    return f" Did you mean '{close[0]}'?" if close else ""


def install_error_handlers(app: FastAPI, field_names: frozenset[str]) -> None:
    """Route every failure, expected or not, to the OpenAI error shape."""

    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default is a 422 with its own shape; OpenAI clients expect a 400 error object.
        return from_validation_error(exc, field_names).response()

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = (
            HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else ""
        )
        message = exc.detail if isinstance(exc.detail, str) else phrase
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server log, never to the client.
        log.exception("unhandled error while serving a request", exc_info=exc)
        return APIError(
            500, "Internal server error; the server log has the details.", code="internal_error"
        ).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
