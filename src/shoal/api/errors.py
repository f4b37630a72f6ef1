"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}, with the right status."""

import logging

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
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    """The JSON body OpenAI clients parse."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


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
    """Route every error the app can raise to an OpenAI-shaped JSON response."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = _param(first.get("loc", ()))
        # a union's branches each fail on one field: say the first branch's reason per field
        firsts = {_param(e.get("loc", ())): e for e in reversed(errors)}
        described = [_describe(e) for e in reversed(firsts.values())]
        message = "; ".join(described[:3]) or "invalid request"
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(ShoalError)
    async def _shoal(_: Request, exc: ShoalError) -> JSONResponse:
        status, code = status_of(exc)
        response = error_response(status, str(exc), getattr(exc, "param", None), code)
        if isinstance(exc, Overloaded):
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
