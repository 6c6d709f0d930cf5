"""A worker process's internal HTTP API, and its registration with the controller.

``quantchat worker`` serves one model for the cluster (``quantchat controller`` + ``quantchat api``).
Routes; every ``/worker`` route needs ``Authorization: Bearer <admin secret>`` (what the API servers send;
the one shared secret where no admin secret is given), over mutual TLS with ``--tls-ca``:

- ``POST /worker/generate[?model=ID]``: a ``GenerateRequest`` (JSON) -> a stream of event dicts, one JSON
  object per line (NDJSON), the same dicts ``Worker.generate`` yields. A request that cannot run is
  refused before the stream starts: JSON ``{"error": {...}, "kind": "<exception class>"}`` with 400
  (bad request, context length), 404 (another model), 429 (queue full) or 503 (still loading).
- ``POST /worker/tokenize`` / ``POST /worker/detokenize``: like the API's ``/tokenize`` / ``/detokenize``.
- ``GET /worker/status``: model, max_model_len, queue_length, running_batch, requests_total, ...
- ``GET /health`` (public, for probes): 200 once the model is loaded, 503 before.

``Registrar`` runs beside the server: it registers the worker with the controller once the model is
loaded, then sends a heartbeat (with the queue length) every ``interval`` seconds; when the controller
answers that it does not know the worker (404: it restarted, or dropped the worker) it registers again.
While the controller is unreachable it retries with backoff and says so once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.datastructures import Headers

from quantchat.errors import ContextLengthError, QuantchatError
from quantchat.serving.backend import LocalBackend
from quantchat.serving.keys import KeyRing, SecretSource
from quantchat.serving.middleware import BodyLimit
from quantchat.serving.openai.errors import error_for, error_response, install_error_handlers
from quantchat.serving.openai.protocol import TokenizeRequest
from quantchat.serving.protocol import GenerateRequest

DEFAULT_HEARTBEAT_INTERVAL = 5.0
WORKER_MAX_BODY = 4 * 1024 * 1024


def bearer_token(header: str) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (None without one)."""
    if not header.lower().startswith("bearer "):
        return None
    return header[7:].strip() or None


def as_ring(keys: KeyRing | str | None, name: str = "secret") -> KeyRing:
    """A ``KeyRing`` of ``keys`` (a ring as it is, a string as a ring of that one key)."""
    if isinstance(keys, KeyRing):
        return keys
    return KeyRing([keys] if keys else [], name=name)


class RequireSecret:
    """ASGI middleware (plain, so streams pass through untouched): every route but /health needs
    ``Authorization: Bearer <key>`` of the ring ``rings(path)`` picks (None: refused)."""

    def __init__(self, app, rings: Callable[[str], KeyRing | None]) -> None:
        self.app, self.rings = app, rings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            ring = self.rings(scope["path"])
            token = bearer_token(Headers(scope=scope).get("authorization", ""))
            if ring is None or not ring.check(token):
                await error_response(401, "missing or wrong cluster secret", "authentication_error")(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def require_secret(app: FastAPI, rings: Callable[[str], KeyRing | None]) -> None:
    """Every route but /health needs a key of ``rings(path)`` (controller and worker apps)."""
    app.add_middleware(RequireSecret, rings=rings)


def worker_error(e: Exception) -> JSONResponse:
    """The API's error response for ``e``, plus ``kind`` so the API side can raise the same exception."""
    resp = error_for(e)
    body = json.loads(resp.body)
    body["kind"] = type(e).__name__ if isinstance(e, QuantchatError) else "InternalError"
    if isinstance(e, ContextLengthError):
        body["error"]["code"] = "context_length_exceeded"
    headers = {k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}
    return JSONResponse(body, status_code=resp.status_code, headers=headers)


def error_event(message: str) -> dict[str, Any]:
    """A terminal event reporting a failure inside a stream (the API shows it as a server error)."""
    return {"text": "", "token_ids": [], "logprobs": [], "prompt_logprobs": None, "finish_reason": "error",
            "error": message, "prompt_tokens": 0, "completion_tokens": 0}


class ClosingStream(StreamingResponse):
    """NDJSON of a worker event stream that always ends the sequence when the response ends.

    The events are pumped by a task that enters the stream at once: closing (cancelling) it then runs
    the stream's cleanup, which cancels the sequence, even when the API server went away before the
    response body started (an async generator closed before its first step never runs its cleanup).
    """

    def __init__(self, stream: AsyncIterator[dict[str, Any]], counters: dict[str, int]) -> None:
        self.events: asyncio.Queue = asyncio.Queue()
        self.counters = counters
        self.pump = asyncio.create_task(self._pump(stream))
        super().__init__(self._lines(), media_type="application/x-ndjson",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _pump(self, stream: AsyncIterator[dict[str, Any]]) -> None:
        self.counters["streams_open"] += 1
        try:
            async for ev in stream:
                self.events.put_nowait(ev)
        except Exception as e:  # the scheduler died, ...: end the stream with an error event
            self.events.put_nowait(error_event(f"worker failure: {type(e).__name__}: {e}"))
        finally:
            self.counters["streams_open"] -= 1
            self.events.put_nowait(None)
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    async def _lines(self) -> AsyncIterator[str]:
        while True:
            ev = await self.events.get()
            if ev is None:
                return
            yield json.dumps(ev, ensure_ascii=False) + "\n"

    async def __call__(self, scope, receive, send) -> None:
        await asyncio.sleep(0)  # let the pump enter the stream (a task cancelled before its first step never does)
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.pump.done():
                self.pump.cancel()  # the API server went away: cancel the sequence, free its slot


class DetokenizeBody(BaseModel):
    tokens: list[int] = Field(max_length=1_000_000)


def create_worker_app(backend: LocalBackend, secret: KeyRing | str, max_body_bytes: int = WORKER_MAX_BODY,
                      info: Callable[[], dict[str, Any]] | None = None,
                      on_shutdown: list[Callable[[], None]] | None = None) -> FastAPI:
    """The internal API of one worker process. ``backend.worker`` may be set later (loading).
    ``secret``: the keys API servers send (the controller's admin secret).

    ``on_shutdown`` runs (in a thread) when the server shuts down gracefully: uvicorn re-raises
    SIGTERM after its shutdown, so code after ``uvicorn.run`` never runs on SIGTERM.
    """
    ring = as_ring(secret)
    if not ring:
        raise QuantchatError("the worker API needs a secret (the admin secret the API servers send)")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for f in on_shutdown or []:
            await asyncio.to_thread(f)

    app = FastAPI(title="quantchat worker", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.backend = backend
    counters = {"generate_requests": 0, "streams_open": 0}

    require_secret(app, lambda path: ring)

    install_error_handlers(app, worker_error)

    @app.get("/health")
    async def health():
        if backend.ready():
            return {"status": "ok"}
        return JSONResponse({"status": "loading" if backend.load_error is None else "failed"},
                            status_code=503, headers={"Retry-After": "5"})

    @app.get("/worker/status")
    async def worker_status():
        out: dict[str, Any] = {"loaded": backend.ready(), "load_error": backend.load_error, **counters}
        if info is not None:
            out.update(info())
        out.update(await backend.stats())
        return out

    @app.post("/worker/generate")
    async def generate(body: GenerateRequest, model: str | None = None):
        stream = await backend.generate(model, body)  # refusals raise here: a JSON error, not a stream
        counters["generate_requests"] += 1
        return ClosingStream(stream, counters)

    @app.post("/worker/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await backend.tokenize(body.model, body)

    @app.post("/worker/detokenize")
    async def detokenize(body: DetokenizeBody, model: str | None = None):
        return {"prompt": await backend.detokenize(model, body.tokens)}

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


class Registrar:
    """Registers a worker with the controller and keeps it registered (a daemon thread).

    ``describe()`` gives the registration (address, model, max_model_len, created) and ``load()``
    the live status (queue_length, running_batch, ...); nothing is sent until ``describe()`` returns
    something (the model is loaded). ``log`` gets one line per change of state, not one per retry.
    """

    def __init__(self, controller_url: str, secret: SecretSource | str, describe: Callable[[], dict[str, Any] | None],
                 load: Callable[[], dict[str, Any]], interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 log: Callable[[str], None] = print, timeout: float = 5.0, max_backoff: float | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if interval <= 0:
            raise QuantchatError("the heartbeat interval must be positive")
        self.url = controller_url.rstrip("/")
        self.secret = secret if isinstance(secret, SecretSource) else SecretSource(secret, name="worker secret")
        self.verify: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self.describe, self.load = describe, load
        self.interval = interval
        self.max_backoff = max_backoff if max_backoff is not None else max(2.0, min(30.0, 4 * interval))
        self.log = log
        self.timeout = timeout
        self.registered = False
        self.registrations = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._problem: str | None = None  # the last state logged, so a repeating failure logs once

    def start(self) -> Registrar:
        self._thread = threading.Thread(target=self._run, name="quantchat-registrar", daemon=True)
        self._thread.start()
        return self

    def stop(self, unregister: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)
        if unregister and self.registered:
            desc = self.describe()
            try:
                httpx.post(f"{self.url}/unregister", json={"address": desc["address"]} if desc else {},
                           headers=self._headers(), timeout=2.0, verify=self.verify)
            except httpx.HTTPError:
                pass
            self.registered = False

    def _headers(self) -> dict[str, str]:
        return self.secret.header()

    def _trouble(self, what: str) -> None:
        if self._problem != what:
            self.log(what)
            self._problem = what

    def step(self, client) -> bool:
        """One registration or heartbeat; True when the controller accepted it."""
        desc = self.describe()
        if desc is None:
            return False
        if not self.registered:
            r = client.post(f"{self.url}/register", json={**desc, "status": self.load()}, headers=self._headers())
            if r.status_code == 200:
                self.registered = True
                self.registrations += 1
                again = " again" if self.registrations > 1 else ""
                self.log(f"registered{again} with the controller {self.url} as {desc['address']} ({desc['model']})")
                self._problem = None
                return True
            self._trouble(f"the controller {self.url} refused the registration of {desc['address']}: "
                          f"HTTP {r.status_code} {_message(r)}")
            return False
        r = client.post(f"{self.url}/heartbeat", json={"address": desc["address"], "status": self.load()},
                        headers=self._headers())
        if r.status_code == 200:
            if self._problem is not None:
                self.log(f"the controller {self.url} answers again")
            self._problem = None
            return True
        if r.status_code == 404:  # the controller restarted or dropped us: register again, now
            self.registered = False
            self.log(f"the controller {self.url} does not know this worker (restarted, or dropped it); "
                     "registering again")
            return self.step(client)
        self._trouble(f"the controller {self.url} refused a heartbeat: HTTP {r.status_code} {_message(r)}")
        return False

    def _run(self) -> None:
        delay = 0.0
        with httpx.Client(timeout=self.timeout, verify=self.verify) as client:
            while not self._stop.wait(delay):
                try:
                    if self.describe() is None:  # still loading
                        delay = min(self.interval, 1.0)
                        continue
                    ok = self.step(client)
                except httpx.HTTPError as e:
                    hint = (" (mutual TLS: is this worker's certificate signed by the fleet CA the controller "
                            "has as --tls-ca, and the controller's by this worker's --tls-ca?)"
                            if isinstance(self.verify, ssl.SSLContext) else "")
                    self._trouble(f"the controller {self.url} is unreachable ({type(e).__name__}: {e}){hint}; "
                                  "retrying in the background")
                    ok = False
                except Exception as e:  # never let the thread die
                    self._trouble(f"registration error: {type(e).__name__}: {e}")
                    ok = False
                delay = self.interval if ok else min(self.max_backoff, max(self.interval, delay * 2))


def _message(r) -> str:
    try:
        return str(r.json()["error"]["message"])
    except Exception:
        return r.text[:200]
