"""Errors in the shape of the dialect a route speaks, with the right status: OpenAI's
{"error": {"message", "type", "param", "code"}}, Anthropic's {"type": "error", "error": {"type",
"message"}} under /v1/messages, Ollama's {"error": "message"} under /api/."""

import logging
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal.errors import (
    BadRequest,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    ShoalError,
    UnsupportedModel,
)

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}

Dialect = Literal["openai", "anthropic", "ollama"]


def dialect_of(path: str) -> Dialect:
    """Which API a path belongs to, so that its errors parse in that API's clients."""
    if path.startswith("/api/"):
        return "ollama"
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    return "openai"


def error_body(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    dialect: Dialect = "openai",
) -> dict:
    """The JSON body the dialect's clients parse (OpenAI's by default)."""
    if dialect == "ollama":
        return {"error": message}
    if dialect == "anthropic":
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    dialect: Dialect = "openai",
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code, dialect), status_code=status)


def status_of(exc: ShoalError) -> tuple[int, str]:
    """HTTP status and error code for a shoal error."""
    if isinstance(exc, BadRequest):
        return 400, "invalid_request"
    if isinstance(exc, ModelNotFound):
        return 404, "model_not_found"
    if isinstance(exc, Overloaded):
        return 429, "overloaded"
    if isinstance(exc, ModelUnavailable | UnsupportedModel):
        return 503, "model_unavailable"
    return 500, "internal_error"


def _param(loc: tuple) -> str | None:
    """The field path of a validation error ("messages.0.content"), without pydantic's own
    steps through unions and validators ("function-after[…]", "list[int]")."""
    parts = [str(p) for p in loc if p != "body" and (isinstance(p, int) or str(p).isidentifier())]
    return ".".join(parts) or None


def _describe(err: dict) -> str:
    where = _param(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}"
    return f"{where}: {err.get('msg')}" if where else str(err.get("msg"))


def install(app: FastAPI) -> None:
    """Route every error the app can raise to a JSON response in the route's dialect."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = _param(first.get("loc", ()))
        # a union's branches each fail on one field: say the first branch's reason per field
        firsts = {_param(e.get("loc", ())): e for e in reversed(errors)}
        described = [_describe(e) for e in reversed(firsts.values())]
        message = "; ".join(described[:3]) or "invalid request"
        dialect = dialect_of(request.url.path)
        return error_response(400, message, param, "invalid_request", dialect)

    @app.exception_handler(ShoalError)
    async def _shoal(request: Request, exc: ShoalError) -> JSONResponse:
        status, code = status_of(exc)
        param = getattr(exc, "param", None)
        response = error_response(status, str(exc), param, code, dialect_of(request.url.path))
        if isinstance(exc, Overloaded):
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        dialect = dialect_of(request.url.path)
        return error_response(exc.status_code, str(exc.detail), dialect=dialect)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        message = f"internal error: {type(exc).__name__}: {exc}"
        return error_response(500, message, dialect=dialect_of(request.url.path))
