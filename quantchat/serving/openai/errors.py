"""Errors as HTTP responses in OpenAI's error shape (the API, the controller and workers use them)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

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
