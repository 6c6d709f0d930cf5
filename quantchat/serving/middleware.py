"""ASGI middleware (plain, so streamed responses pass through untouched): API keys and counts, body limits."""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders

from quantchat.serving.keys import KeyRing
from quantchat.serving.metrics import Metrics
from quantchat.serving.openai.errors import error_response

PUBLIC_PATHS = ("/health", "/openapi.json")
BODY_TIMEOUT_S = 30.0


class AuthAndCount:
    """The API key on every route but /health and the page's files (401), security headers, request
    counts by route and status."""

    def __init__(self, app, keys: KeyRing, metrics: Metrics, web: bool) -> None:
        self.app, self.keys, self.metrics, self.web = app, keys, metrics, web

    def authorized(self, headers: Headers) -> bool:
        header = headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else headers.get("x-api-key")
        return self.keys.check(given)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        public = path in PUBLIC_PATHS or (self.web and (path == "/" or path.startswith("/static/")))
        if self.keys and not public and not self.authorized(Headers(scope=scope)):
            self.metrics.requests[(path, 401)] += 1
            response = error_response(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY')",
                                      "authentication_error", headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        route = path if path.startswith("/v1/") or path in ("/tokenize", "/detokenize") else "other"

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                self.metrics.requests[(route, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 (declared or streamed), and bodies that stall for
    ``timeout_s`` between chunks (a slow client) with 408."""

    def __init__(self, app, max_bytes: int, timeout_s: float | None = BODY_TIMEOUT_S) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    def too_big(self) -> JSONResponse:
        return error_response(413, f"request body larger than {self.max_bytes} bytes", "invalid_request_error")

    def too_slow(self) -> JSONResponse:
        return error_response(408, f"the request body stalled for {self.timeout_s:g} s", "invalid_request_error",
                              headers={"Connection": "close"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_big()(scope, receive, send)
        seen = 0
        body_done = False
        refused: list[JSONResponse] = []  # our answer once the body was refused (the app may have caught it)
        replaced = False

        async def limited():
            nonlocal seen, body_done
            if refused:
                return {"type": "http.disconnect"}
            if body_done or self.timeout_s is None:
                message = await receive()  # after the body: waits for the disconnect (streams), no timeout
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.timeout_s)
                except asyncio.TimeoutError:
                    refused.append(self.too_slow())
                    raise BodyTimeout from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.max_bytes:
                    refused.append(self.too_big())
                    raise BodyTooLarge
            return message

        async def guarded_send(message) -> None:
            nonlocal replaced
            if refused:  # FastAPI turns any error while reading the body into its own 400: send ours instead
                if not replaced:
                    replaced = True
                    await refused[0](scope, receive, send)
                return
            await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except (BodyTooLarge, BodyTimeout):
            pass
        if refused and not replaced:
            await refused[0](scope, receive, send)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass
