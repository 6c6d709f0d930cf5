"""The OpenAI-compatible HTTP API (and the web chat page) over a ``Backend``.

Routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (streaming as SSE),
``/tokenize``, ``/detokenize``, ``/health``, ``/metrics`` (Prometheus text), ``/`` (chat page).
A ``Backend`` is where sequences run: a ``LocalBackend`` holds an in-process ``Worker``; the
controller's backend (``quantchat.serving.controller``) dispatches to remote workers. Every route
but ``/health`` and the page's static files needs the API key when one is set.
"""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from importlib import resources
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from quantchat.errors import (
    BadRequestError,
    ContextLengthError,
    QuantchatError,
    QueueFullError,
    UnavailableError,
    UnknownModelError,
)
from quantchat.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
    error_body,
)

DEFAULT_MAX_BODY = 4 * 1024 * 1024
PUBLIC_PATHS = ("/health",)
STATIC_PATHS = ("/", "/static/")


class Backend(Protocol):
    def ready(self) -> bool: ...
    async def models(self) -> list[dict[str, Any]]: ...
    async def generate(self, model: str | None, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]: ...
    async def tokenize(self, model: str | None, req: TokenizeRequest) -> dict[str, Any]: ...
    async def detokenize(self, model: str | None, tokens: list[int]) -> str: ...
    async def stats(self) -> dict[str, Any]: ...


class LocalBackend:
    """One in-process worker (set once loaded; until then requests get 503)."""

    def __init__(self, worker=None) -> None:
        self.worker = worker
        self.load_error: str | None = None

    def ready(self) -> bool:
        return self.worker is not None

    def _worker(self, model: str | None):
        if self.worker is None:
            raise UnavailableError(self.load_error or "the model is still loading")
        if model not in (None, "", self.worker.model_name):
            raise UnknownModelError(f"The model '{model}' does not exist (served: {self.worker.model_name})")
        return self.worker

    async def models(self) -> list[dict[str, Any]]:
        if self.worker is None:
            return []
        w = self.worker
        return [{"id": w.model_name, "created": w.created, "max_model_len": w.max_seq_len}]

    async def generate(self, model: str | None, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        return await self._worker(model).generate(req)

    async def tokenize(self, model: str | None, req: TokenizeRequest) -> dict[str, Any]:
        w = self._worker(model)
        msgs = None if req.messages is None else [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = w.tokenize(req.prompt, msgs, req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": w.max_seq_len}

    async def detokenize(self, model: str | None, tokens: list[int]) -> str:
        return self._worker(model).detokenize(tokens)

    async def stats(self) -> dict[str, Any]:
        return {} if self.worker is None else self.worker.status()


# -- errors -------------------------------------------------------------------------------------
def error_response(status: int, message: str, type_: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, status), status_code=status, headers=headers)


def error_for(e: Exception) -> JSONResponse:
    if isinstance(e, UnknownModelError):
        return error_response(404, str(e), "invalid_request_error", "model")
    if isinstance(e, QueueFullError):
        return error_response(429, str(e), "rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(e, UnavailableError):
        return error_response(503, str(e), "service_unavailable", headers={"Retry-After": "5"})
    if isinstance(e, (BadRequestError, ContextLengthError, QuantchatError, ValueError)):
        return error_response(400, str(e), "invalid_request_error", getattr(e, "param", None))
    return error_response(500, f"internal error: {type(e).__name__}", "server_error")


class AuthAndCount:
    """ASGI middleware (plain, so streamed responses pass through untouched): the API key on every route
    but /health and the page's files (401), security headers, request counts by route and status."""

    def __init__(self, app, keys: set[str], metrics: Metrics, web: bool) -> None:
        self.app, self.keys, self.metrics, self.web = app, [k.encode("utf-8") for k in keys], metrics, web

    def authorized(self, headers: Headers) -> bool:
        header = headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else headers.get("x-api-key")
        raw = (given or "").encode("utf-8", "surrogateescape")
        return bool(given) and any(secrets.compare_digest(raw, k) for k in self.keys)

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
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = JSONResponse(error_body(f"request body larger than {self.max_bytes} bytes",
                                          "invalid_request_error", None, 413), status_code=413)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        try:
            return await self.app(scope, limited, send)
        except BodyTooLarge:
            return await too_big(scope, receive, send)


class BodyTooLarge(Exception):
    pass


# -- metrics ------------------------------------------------------------------------------------
class Metrics:
    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)

    def add_tokens(self, n: int) -> None:
        self.generation_tokens += n
        now = time.monotonic()
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - 10.0:
            self.recent.popleft()

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - 10.0:
            self.recent.popleft()
        return sum(n for _, n in self.recent) / 10.0

    def render(self, backend_stats: dict[str, Any]) -> str:
        lines = ["# HELP quantchat_requests_total HTTP requests by route and status",
                 "# TYPE quantchat_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'quantchat_requests_total{{route="{route}",status="{status}"}} {n}')
        gauges = {
            "quantchat_prompt_tokens_total": ("counter", "prompt tokens processed", self.prompt_tokens),
            "quantchat_generation_tokens_total": ("counter", "tokens generated", self.generation_tokens),
            "quantchat_generation_tokens_per_second": ("gauge", "tokens generated per second, last 10 s",
                                                       self.tokens_per_s()),
            "quantchat_queue_length": ("gauge", "requests waiting for a slot", backend_stats.get("queue_length", 0)),
            "quantchat_running_batch": ("gauge", "sequences in the running batch",
                                        backend_stats.get("running_batch", 0)),
            "quantchat_kv_cache_usage_ratio": ("gauge", "fraction of KV-cache positions in use",
                                               backend_stats.get("kv_cache_usage", 0.0)),
        }
        if "prompt_tokens_cached_total" in backend_stats:
            gauges["quantchat_prompt_tokens_cached_total"] = (
                "counter", "prompt tokens whose KV was reused from a slot (prefix reuse)",
                backend_stats["prompt_tokens_cached_total"])
        if "workers" in backend_stats:
            gauges["quantchat_workers"] = ("gauge", "live workers", backend_stats["workers"])
        if "prefill_seconds_total" in backend_stats:
            gauges["quantchat_prefill_seconds_total"] = ("counter", "seconds the worker spent prefilling prompts",
                                                         backend_stats["prefill_seconds_total"])
        for name, (kind, help_, value) in gauges.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {float(value):g}"]
        by_batch = sorted((int(b), v) for b, v in (backend_stats.get("decode_time_by_batch") or {}).items())
        if by_batch:
            for name, help_, i in (("quantchat_decode_steps_total", "decode steps by running batch size", 0),
                                   ("quantchat_decode_seconds_total",
                                    "seconds in decode steps (model, sampling, events) by batch size", 1)):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
                lines += [f'{name}{{batch="{b}"}} {float(v[i]):g}' for b, v in by_batch]
        return "\n".join(lines) + "\n"


# -- response building --------------------------------------------------------------------------
def chat_logprobs(entries: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    def one(tok: str, lp: float) -> dict[str, Any]:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    return [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, v) for t, v in e["top"][:top]]}
            for e in entries]


class CompletionLogprobs:
    """Accumulates OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.offset = 0

    def add(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            self.tokens.append(e["token"])
            self.token_logprobs.append(e["logprob"])
            top = None
            if e["logprob"] is not None:
                top = {t: v for t, v in e["top"]}
                top.setdefault(e["token"], e["logprob"])  # the sampled token is always listed
            self.top_logprobs.append(top)
            self.text_offset.append(self.offset)
            self.offset += len(e["token"])

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def generate_request(body: ChatCompletionRequest | CompletionRequest, seed_offset: int, **kw) -> GenerateRequest:
    return GenerateRequest(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=None if body.seed is None else body.seed + seed_offset, stop=body.stop, ignore_eos=body.ignore_eos,
        **kw,
    )


async def merged(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """Interleave several event streams as (index, event) in arrival order."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncIterator[dict]) -> None:
        try:
            async for ev in s:
                await queue.put((i, ev))
        except Exception as e:  # surfaces in the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, ev = await queue.get()
            if ev is done:
                left -= 1
            elif isinstance(ev, Exception):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            close = getattr(s, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    pass


async def start_all(backend: Backend, model: str | None, reqs: list[GenerateRequest]) -> list[AsyncIterator[dict]]:
    """Start every sequence, or none: if one fails validation the started ones are closed."""
    streams: list[AsyncIterator[dict]] = []
    try:
        for r in reqs:
            streams.append(await backend.generate(model, r))
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    return streams


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run ``work``; cancel it (freeing its slots) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError
    return task.result()


# -- the app ------------------------------------------------------------------------------------
def create_app(backend: Backend, api_keys: set[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               web: bool = True, title: str = "quantchat") -> FastAPI:
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    keys = {k for k in (api_keys or set()) if k}
    app.state.backend, app.state.metrics = backend, metrics


    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        return error_response(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}", "invalid_request_error",
                              ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(QuantchatError)
    async def on_quantchat(request: Request, exc: QuantchatError):
        return error_for(exc)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if backend.ready():
            return {"status": "ok"}
        failed = getattr(backend, "load_error", None)
        if failed:
            return JSONResponse({"status": "error", "message": failed}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(await backend.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        models = await backend.models()
        return {"object": "list", "data": [
            {"id": m["id"], "object": "model", "created": m.get("created", 0), "owned_by": "quantchat",
             "max_model_len": m.get("max_model_len")} for m in models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for m in await backend.models():
            if m["id"] == model_id:
                return {"id": m["id"], "object": "model", "created": m.get("created", 0), "owned_by": "quantchat"}
        raise UnknownModelError(f"The model '{model_id}' does not exist")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await backend.tokenize(body.model, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return {"prompt": await backend.detokenize(body.model, body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
        except ValueError as e:
            raise BadRequestError(str(e), "messages") from None
        want_lp = body.logprobs
        top = body.top_logprobs or 0
        reqs = [generate_request(body, i, messages=messages, max_tokens=body.limit(),
                                 add_generation_prompt=body.add_generation_prompt,
                                 logprobs=top if want_lp else None) for i in range(body.n)]
        streams = await start_all(backend, body.model, reqs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        model = body.model or (await backend.models() or [{"id": "unknown"}])[0]["id"]

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(i: int, delta: dict, finish: str | None = None, lp: Any = None) -> dict:
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

            async def events() -> AsyncIterator[str]:
                usage = {"prompt_tokens": 0, "completion_tokens": 0}
                try:
                    for i in range(body.n):
                        yield sse(chunk(i, {"role": "assistant", "content": ""}))
                    async for i, ev in merged(streams):
                        if ev.get("error"):
                            yield sse(error_body(ev["error"], "server_error", None, 500))
                            yield "data: [DONE]\n\n"
                            return
                        metrics.add_tokens(len(ev["token_ids"]))
                        lp = {"content": chat_logprobs(ev["logprobs"], top)} if want_lp and ev["logprobs"] else None
                        if ev["text"] or lp:
                            yield sse(chunk(i, {"content": ev["text"]}, None, lp))
                        if ev["finish_reason"]:
                            usage["completion_tokens"] += ev["completion_tokens"]
                            usage["prompt_tokens"] = ev["prompt_tokens"]
                            metrics.prompt_tokens += ev["prompt_tokens"]
                            yield sse(chunk(i, {}, normal_finish(ev["finish_reason"])))
                    if include_usage:
                        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                        yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                   "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                except QuantchatError as e:
                    yield sse(error_body(str(e), "server_error", None, 500))
                    yield "data: [DONE]\n\n"
                finally:
                    for s in streams:
                        await s.aclose()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect() -> dict:
            texts = [[] for _ in range(body.n)]
            lps: list[list[dict]] = [[] for _ in range(body.n)]
            finish: list[str | None] = [None] * body.n
            prompt_tokens = completion_tokens = 0
            async for i, ev in merged(streams):
                if ev.get("error"):
                    raise UnavailableError(ev["error"])
                texts[i].append(ev["text"])
                lps[i] += ev["logprobs"]
                metrics.add_tokens(len(ev["token_ids"]))
                if ev["finish_reason"]:
                    finish[i] = normal_finish(ev["finish_reason"])
                    prompt_tokens = ev["prompt_tokens"]
                    completion_tokens += ev["completion_tokens"]
            metrics.prompt_tokens += prompt_tokens
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                             "logprobs": {"content": chat_logprobs(lps[i], top)} if want_lp else None,
                             "finish_reason": finish[i]} for i in range(body.n)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            }

        try:
            return await until_disconnect(request, collect())
        finally:
            for s in streams:
                await s.aclose()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        try:
            prompts = body.prompts()
        except ValueError as e:
            raise BadRequestError(str(e), "prompt") from None
        if body.suffix:
            raise BadRequestError("suffix is not supported", "suffix")
        reqs = []
        for p in prompts:
            for j in range(body.n):
                kw = {"prompt": p} if isinstance(p, str) else {"prompt_ids": p}
                reqs.append(generate_request(body, j, max_tokens=body.max_tokens, echo=body.echo,
                                             logprobs=body.logprobs, **kw))
        streams = await start_all(backend, body.model, reqs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        model = body.model or (await backend.models() or [{"id": "unknown"}])[0]["id"]
        want_lp = body.logprobs is not None

        def first_text(ev: dict) -> str:
            return (ev.get("prompt_text") or "") if body.echo else ""

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(i: int, text: str, finish: str | None, lp: Any) -> dict:
                return {"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}

            async def events() -> AsyncIterator[str]:
                usage = {"prompt_tokens": 0, "completion_tokens": 0}
                seen: set[int] = set()
                offsets: dict[int, int] = {}
                try:
                    async for i, ev in merged(streams):
                        if ev.get("error"):
                            yield sse(error_body(ev["error"], "server_error", None, 500))
                            yield "data: [DONE]\n\n"
                            return
                        text = ev["text"]
                        entries = ev["logprobs"]
                        if i not in seen:
                            seen.add(i)
                            text = first_text(ev) + text
                            if body.echo and ev.get("prompt_logprobs"):
                                entries = ev["prompt_logprobs"] + entries
                        lp = None
                        if want_lp and entries:
                            acc = CompletionLogprobs()
                            acc.offset = offsets.get(i, 0)  # text_offset counts from the choice's start
                            acc.add(entries)
                            offsets[i] = acc.offset
                            lp = acc.as_dict()
                        metrics.add_tokens(len(ev["token_ids"]))
                        finish = normal_finish(ev["finish_reason"]) if ev["finish_reason"] else None
                        if text or lp or finish:
                            yield sse(chunk(i, text, finish, lp))
                        if finish:
                            usage["completion_tokens"] += ev["completion_tokens"]
                            usage["prompt_tokens"] += ev["prompt_tokens"] if i % body.n == 0 else 0
                            metrics.prompt_tokens += ev["prompt_tokens"]
                    if include_usage:
                        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                                   "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                except QuantchatError as e:
                    yield sse(error_body(str(e), "server_error", None, 500))
                    yield "data: [DONE]\n\n"
                finally:
                    for s in streams:
                        await s.aclose()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect() -> dict:
            k = len(reqs)
            texts: list[list[str]] = [[] for _ in range(k)]
            accs = [CompletionLogprobs() for _ in range(k)]
            finish: list[str | None] = [None] * k
            seen: set[int] = set()
            prompt_tokens = completion_tokens = 0
            async for i, ev in merged(streams):
                if ev.get("error"):
                    raise UnavailableError(ev["error"])
                if i not in seen:
                    seen.add(i)
                    texts[i].append(first_text(ev))
                    if body.echo and ev.get("prompt_logprobs"):
                        accs[i].add(ev["prompt_logprobs"])
                texts[i].append(ev["text"])
                accs[i].add(ev["logprobs"])
                metrics.add_tokens(len(ev["token_ids"]))
                if ev["finish_reason"]:
                    finish[i] = normal_finish(ev["finish_reason"])
                    if i % body.n == 0:
                        prompt_tokens += ev["prompt_tokens"]
                    completion_tokens += ev["completion_tokens"]
            metrics.prompt_tokens += prompt_tokens
            return {
                "id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": "".join(texts[i]),
                             "logprobs": accs[i].as_dict() if want_lp else None,
                             "finish_reason": finish[i]} for i in range(k)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            }

        try:
            return await until_disconnect(request, collect())
        finally:
            for s in streams:
                await s.aclose()

    if web:
        install_web(app)
    app.add_middleware(AuthAndCount, keys=keys, metrics=metrics, web=web)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


def normal_finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop" if reason == "abort" else reason


def install_web(app: FastAPI) -> None:
    """Serve the chat page and its assets from the package (no CDN, no build step)."""
    web_dir = resources.files("quantchat.serving") / "web"

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def index():
        page = web_dir / "index.html"
        if not page.is_file():
            return HTMLResponse("<h1>quantchat</h1><p>The chat page is not installed.</p>")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png"}

    @app.api_route("/static/{name}", methods=["GET", "HEAD"])
    async def static(name: str):
        f = web_dir / name
        if "/" in name or name.startswith(".") or not f.is_file():
            return error_response(404, f"no such file: {name}", "invalid_request_error")
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        return Response(f.read_bytes(), media_type=types.get(suffix, "application/octet-stream"))
