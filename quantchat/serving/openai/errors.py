"""Errors as HTTP responses in OpenAI's error shape (the API, the controller and workers use them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from quantchat.errors import (
    BadRequestError,
    ContextLengthError,
    QuantchatError,
    QueueFullError,
    UnavailableError,
    UnknownModelError,
)
from quantchat.serving.openai.protocol import ErrorInfo, ErrorResponse


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, status), status_code=status, headers=headers)


def error_for(e: Exception) -> JSONResponse:
    """The response for an exception: its status, OpenAI error type and message."""
    if isinstance(e, UnknownModelError):
        return error_response(404, str(e), "invalid_request_error", "model")
    if isinstance(e, QueueFullError):
        return error_response(429, str(e), "rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(e, UnavailableError):
        return error_response(503, str(e), "service_unavailable", headers={"Retry-After": "5"})
    if isinstance(e, (BadRequestError, ContextLengthError, QuantchatError, ValueError)):
        return error_response(400, str(e), "invalid_request_error", getattr(e, "param", None))
    return error_response(500, f"internal error: {type(e).__name__}", "server_error")


def validation_error(exc: RequestValidationError) -> BadRequestError:
    """A request body that failed its pydantic model, as one 400 naming the first bad field."""
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = ".".join(str(x) for x in first.get("loc", []) if x != "body")
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        msg = "the request body is not valid JSON"
    return BadRequestError(f"{loc + ': ' if loc else ''}{msg}", param=loc or None)


def install_error_handlers(app: FastAPI, to_response: Callable[[Exception], Response] = error_for,
                           quantchat_errors: bool = True) -> None:
    """Every error of ``app`` in OpenAI's shape: bad bodies (400), HTTP errors (their status) and, with
    ``quantchat_errors``, quantchat's own exceptions, through ``to_response``."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        return to_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's words
            message = "the request body is not valid JSON (it must be UTF-8 JSON text)"
        return error_response(exc.status_code, message, "invalid_request_error")

    if quantchat_errors:
        @app.exception_handler(QuantchatError)
        async def on_quantchat(request: Request, exc: QuantchatError) -> Response:
            return to_response(exc)
