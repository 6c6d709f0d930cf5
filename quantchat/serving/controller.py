"""The cluster controller, and the API server's backend that goes through it.

``quantchat controller`` keeps the list of live workers (``quantchat worker``, each one model on its
own port or machine) and tells the API server (``quantchat api``) which worker should take a request.

Controller routes; all but ``/health`` need ``Authorization: Bearer <secret>``: the workers' registration
secret for ``/register``, ``/heartbeat`` and ``/unregister``, the admin secret (the API servers') for the rest:

- ``POST /register`` ``{address, model, max_model_len, created, status}``: 403 unless ``address``
  matches the allow-list (``--allow-worker``; loopback and private ranges by default), since the API
  server sends requests, with the admin secret, to whatever address is registered.
- ``POST /heartbeat`` ``{address, status}``: 404 when the controller does not know the worker (it
  restarted, or dropped the worker): the worker then registers again.
- ``POST /unregister`` ``{address}``, ``POST /report_failure`` ``{address}`` (the API could not reach it:
  dropped at once; a live worker comes back with its next heartbeat).
- ``GET /workers``: the live workers and their load.
- ``POST /dispatch`` ``{model, exclude}``: the live worker of ``model`` with the least load (waiting +
  running + dispatched since its last heartbeat); ties go round robin. 404 when no worker serves the
  model, 503 when there is no (other) live worker.

Workers whose last heartbeat is older than ``expiry`` seconds are dropped.

``ControllerBackend`` implements ``quantchat.serving.backend.Backend`` over the controller: it asks for a
worker, streams ``/worker/generate`` from it, and when the worker fails before the first event
(connection refused or reset, 5xx) reports it and retries on another worker.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import json
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
from fastapi import FastAPI
from pydantic import BaseModel, Field

from quantchat.errors import (
    BadRequestError,
    ContextLengthError,
    QuantchatError,
    QueueFullError,
    UnavailableError,
    UnknownModelError,
)
from quantchat.serving.middleware import BodyLimit
from quantchat.serving.openai.errors import error_response, install_error_handlers
from quantchat.serving.openai.protocol import TokenizeRequest
from quantchat.serving.protocol import GenerateRequest
from quantchat.serving.keys import KeyRing, SecretSource
from quantchat.serving.worker_server import as_ring, error_event, require_secret

DEFAULT_PORT = 21001
DEFAULT_EXPIRY = 20.0
# loopback and the private ranges (RFC 1918, IPv6 unique local): where a cluster's pods and hosts live
DEFAULT_ALLOW = ("127.0.0.0/8", "::1", "localhost", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
WORKER_ROUTES = ("/register", "/heartbeat", "/unregister")
MAX_WORKERS = 4096
STATUS_FIELDS = {"queue_length": int, "running_batch": int, "max_batch": int, "kv_cache_usage": float,
                 "requests_total": int, "requests_finished": int, "generation_tokens_total": int,
                 "prompt_tokens_total": int}


# -- which addresses may register ---------------------------------------------------------------
_HOST_PATTERN = re.compile(r"^[A-Za-z0-9*?.\-]+$")


@dataclass(frozen=True)
class AllowRule:
    text: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None  # an address range...
    host: str | None  # ...or a host name pattern (fnmatch: worker-*.quantchat.svc)
    port: int | None  # None: any port

    def matches(self, host: str, ip, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            if ip is None:
                return False
            if ip.version != self.network.version:
                mapped = getattr(ip, "ipv4_mapped", None)
                return mapped is not None and mapped in self.network
            return ip in self.network
        return ip is None and fnmatch.fnmatchcase(host, self.host or "")


def parse_allow_rule(text: str) -> AllowRule:
    """``10.0.0.0/8``, ``127.0.0.1``, ``::1``, ``[fd00::]/8:21002``, ``10.1.2.3:21002``, ``worker-*.svc:*``."""
    s = text.strip()
    if not s:
        raise QuantchatError("empty --allow-worker pattern")
    port: int | None = None
    base = s
    try:
        return AllowRule(s, ipaddress.ip_network(s.strip("[]"), strict=False), None, None)
    except ValueError:
        pass
    if ":" in s and not (s.count(":") > 1 and not s.startswith("[")):  # host:port ([v6]:port for IPv6)
        base, _, p = s.rpartition(":")
        if p != "*":
            if not p.isdigit() or not 0 < int(p) < 65536:
                raise QuantchatError(f"--allow-worker {text!r}: bad port {p!r}")
            port = int(p)
    try:
        return AllowRule(s, ipaddress.ip_network(base.replace("[", "").replace("]", ""), strict=False), None, port)
    except ValueError:
        pass
    if not _HOST_PATTERN.match(base):
        raise QuantchatError(f"--allow-worker {text!r}: not an address, CIDR range or host name pattern")
    return AllowRule(s, None, base.lower(), port)


class AddressPolicy:
    """Which worker addresses the controller accepts (so the API server is never sent elsewhere)."""

    def __init__(self, patterns: list[str] | tuple[str, ...] = DEFAULT_ALLOW) -> None:
        self.rules = [parse_allow_rule(p) for p in patterns]

    @staticmethod
    def normalize(address: str) -> tuple[str, str, Any, int]:
        """``(url, host, ip or None, port)`` of a worker address ``http(s)://host:port``; ValueError if malformed."""
        if len(address) > 2048:
            raise ValueError("the address is too long")
        u = urlsplit(address.strip())
        if u.scheme not in ("http", "https"):
            raise ValueError("the address must be an http:// or https:// URL")
        if u.username is not None or u.password is not None or u.query or u.fragment or u.path not in ("", "/"):
            raise ValueError("the address must be scheme://host:port, nothing more")
        host = (u.hostname or "").lower()
        if not host:
            raise ValueError("the address has no host")
        port = u.port or (443 if u.scheme == "https" else 80)  # u.port raises ValueError when out of range
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
            if not _HOST_PATTERN.match(host) or "*" in host or "?" in host:
                raise ValueError("the address has an invalid host name") from None
        shown = f"[{host}]" if ip is not None and ip.version == 6 else host
        return f"{u.scheme}://{shown}:{port}", host, ip, port

    def check(self, address: str) -> str:
        """The normalized address if it may register; PermissionError if not, ValueError if malformed."""
        url, host, ip, port = self.normalize(address)
        if not any(r.matches(host, ip, port) for r in self.rules):
            raise PermissionError(f"{url} is not an allowed worker address (allowed: "
                                  f"{', '.join(r.text for r in self.rules) or 'none'}; see --allow-worker)")
        return url


# -- the controller's state ---------------------------------------------------------------------
@dataclass
class WorkerEntry:
    address: str
    model: str
    max_model_len: int
    created: int
    registered_at: float
    last_seen: float
    status: dict[str, Any] = field(default_factory=dict)
    dispatched: int = 0  # dispatched since the last heartbeat (the heartbeat's counts include them)
    dispatched_total: int = 0

    @property
    def load(self) -> int:
        return int(self.status.get("queue_length", 0)) + int(self.status.get("running_batch", 0)) + self.dispatched

    @property
    def healthy(self) -> bool:
        return not self.status.get("error")


def clean_status(raw: Any) -> dict[str, Any]:
    """The numeric load fields of a worker's status (anything else it sent is ignored)."""
    out: dict[str, Any] = {}
    if not isinstance(raw, dict):
        return out
    for k, kind in STATUS_FIELDS.items():
        v = raw.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) < 1e15:
            out[k] = kind(v)
    err = raw.get("error")
    if isinstance(err, str) and err:
        out["error"] = err[:500]
    return out


class Controller:
    def __init__(self, expiry: float = DEFAULT_EXPIRY, policy: AddressPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] = lambda s: None) -> None:
        if expiry <= 0:
            raise QuantchatError("the heartbeat expiry must be positive")
        self.expiry = expiry
        self.policy = policy or AddressPolicy()
        self.clock = clock
        self.log = log
        self.workers: dict[str, WorkerEntry] = {}
        self.lock = threading.Lock()
        self._rr = 0

    def purge(self) -> None:
        now = self.clock()
        with self.lock:
            for addr, w in list(self.workers.items()):
                if now - w.last_seen > self.expiry:
                    del self.workers[addr]
                    self.log(f"dropped worker {addr} ({w.model}): no heartbeat for {now - w.last_seen:.1f} s")

    def register(self, address: str, model: str, max_model_len: int, created: int = 0,
                 status: Any = None) -> WorkerEntry:
        url = self.policy.check(address)
        now = self.clock()
        with self.lock:
            if url not in self.workers and len(self.workers) >= MAX_WORKERS:
                raise QueueFullError(f"the controller already has {MAX_WORKERS} workers")
            old = self.workers.get(url)
            w = WorkerEntry(url, model, max_model_len, created, now, now, clean_status(status))
            if old is not None and old.model == model:
                w.dispatched_total, w.registered_at = old.dispatched_total, old.registered_at
            self.workers[url] = w
        self.log(f"worker {url} registered ({model}, context {max_model_len})")
        return w

    def heartbeat(self, address: str, status: Any = None) -> WorkerEntry | None:
        self.purge()
        try:
            url = AddressPolicy.normalize(address)[0]
        except ValueError:
            return None
        with self.lock:
            w = self.workers.get(url)
            if w is None:
                return None
            w.last_seen = self.clock()
            w.status = clean_status(status)
            w.dispatched = 0
            return w

    def remove(self, address: str, why: str) -> bool:
        try:
            url = AddressPolicy.normalize(address)[0]
        except ValueError:
            return False
        with self.lock:
            w = self.workers.pop(url, None)
        if w is not None:
            self.log(f"dropped worker {url} ({w.model}): {why}")
        return w is not None

    def dispatch(self, model: str | None, exclude: list[str] | None = None) -> WorkerEntry:
        """The least loaded live worker of ``model`` (any model when None); ties round robin."""
        self.purge()
        skip = set()
        for a in exclude or []:
            try:
                skip.add(AddressPolicy.normalize(a)[0])
            except ValueError:
                pass
        with self.lock:
            live = [w for w in self.workers.values() if w.healthy]
            if model:
                if not any(w.model == model for w in self.workers.values()):
                    served = sorted({w.model for w in self.workers.values()})
                    if not served:
                        raise UnavailableError("no worker is registered with the controller")
                    raise UnknownModelError(f"The model '{model}' does not exist (served: {', '.join(served)})")
                live = [w for w in live if w.model == model]
            live = [w for w in live if w.address not in skip]
            if not live:
                raise UnavailableError("no live worker can take the request"
                                       + (f" for the model '{model}'" if model else ""))
            least = min(w.load for w in live)
            ties = sorted((w for w in live if w.load == least), key=lambda w: w.address)
            w = ties[self._rr % len(ties)]
            self._rr += 1
            w.dispatched += 1
            w.dispatched_total += 1
            return w

    def listing(self) -> list[dict[str, Any]]:
        self.purge()
        now = self.clock()
        with self.lock:
            return [{"address": w.address, "model": w.model, "max_model_len": w.max_model_len,
                     "created": w.created, "healthy": w.healthy, "load": w.load,
                     "dispatched_total": w.dispatched_total,
                     "last_heartbeat_s": round(now - w.last_seen, 3),
                     "registered_s": round(now - w.registered_at, 3), **w.status}
                    for w in sorted(self.workers.values(), key=lambda w: w.address)]


# -- the controller's HTTP API ------------------------------------------------------------------
class RegisterBody(BaseModel):
    address: str = Field(max_length=2048)
    model: str = Field(min_length=1, max_length=256)
    max_model_len: int = Field(ge=1)
    created: int = 0
    status: dict[str, Any] = Field(default_factory=dict)


class HeartbeatBody(BaseModel):
    address: str = Field(max_length=2048)
    status: dict[str, Any] = Field(default_factory=dict)


class AddressBody(BaseModel):
    address: str = Field(max_length=2048)


class DispatchBody(BaseModel):
    model: str | None = Field(None, max_length=256)
    exclude: list[str] = Field(default_factory=list, max_length=64)


def create_controller_app(controller: Controller, worker_secret: KeyRing | str,
                          admin_secret: KeyRing | str | None = None, max_body_bytes: int = 1024 * 1024) -> FastAPI:
    """The controller's routes: /register, /heartbeat, /unregister take the workers' registration secret,
    the others the admin secret (the API servers'); one string for both when ``admin_secret`` is None."""
    worker_ring = as_ring(worker_secret, "worker secret")
    admin_ring = as_ring(admin_secret, "admin secret") if admin_secret is not None else worker_ring
    if not worker_ring or not admin_ring:
        raise QuantchatError("the controller needs a worker registration secret and an admin secret")
    app = FastAPI(title="quantchat controller", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.controller = controller

    require_secret(app, lambda path: worker_ring if path in WORKER_ROUTES else admin_ring)

    install_error_handlers(app, quantchat_errors=False)

    @app.get("/health")
    async def health():
        return {"status": "ok", "workers": len(controller.listing())}

    @app.post("/register")
    async def register(body: RegisterBody):
        try:
            w = controller.register(body.address, body.model, body.max_model_len, body.created, body.status)
        except PermissionError as e:
            controller.log(f"refused a registration: {e}")
            return error_response(403, str(e), "permission_error", "address")
        except ValueError as e:
            return error_response(400, f"address: {e}", "invalid_request_error", "address")
        except QueueFullError as e:
            return error_response(429, str(e), "rate_limit_error")
        return {"ok": True, "address": w.address, "heartbeat_expiry": controller.expiry}

    @app.post("/heartbeat")
    async def heartbeat(body: HeartbeatBody):
        if controller.heartbeat(body.address, body.status) is None:
            return error_response(404, "unknown worker: register first", "not_found_error", "address")
        return {"ok": True}

    @app.post("/unregister")
    async def unregister(body: AddressBody):
        return {"ok": controller.remove(body.address, "it unregistered")}

    @app.post("/report_failure")
    async def report_failure(body: AddressBody):
        return {"ok": controller.remove(body.address, "the API server could not reach it")}

    @app.get("/workers")
    async def workers():
        listing = controller.listing()
        return {"workers": listing, "models": sorted({w["model"] for w in listing}),
                "heartbeat_expiry": controller.expiry}

    @app.post("/dispatch")
    async def dispatch(body: DispatchBody):
        try:
            w = controller.dispatch(body.model, body.exclude)
        except UnknownModelError as e:
            return error_response(404, str(e), "invalid_request_error", "model")
        except UnavailableError as e:
            return error_response(503, str(e), "service_unavailable")
        return {"address": w.address, "model": w.model, "max_model_len": w.max_model_len}

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


# -- the API server's backend -------------------------------------------------------------------
ERRORS_BY_KIND: dict[str, type[QuantchatError]] = {
    "BadRequestError": BadRequestError, "ContextLengthError": ContextLengthError,
    "UnknownModelError": UnknownModelError, "QueueFullError": QueueFullError, "UnavailableError": UnavailableError,
}
REFUSALS = (400, 404, 413, 422, 429)  # the request's fault (or a full queue): no retry elsewhere
# a worker that cannot be reached, drops the connection, or stalls past the read timeout
STREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


async def stream_lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The lines of a streamed body, of any length (aiohttp's own line iterator refuses lines over 128 KiB:
    an echoed long prompt's logprobs make one); a last line without its newline comes out as it is."""
    parts: list[bytes] = []
    async for chunk in content.iter_any():
        while (i := chunk.find(b"\n")) >= 0:
            parts.append(chunk[:i])
            yield b"".join(parts)
            parts, chunk = [], chunk[i + 1:]
        if chunk:
            parts.append(chunk)
    if parts:
        yield b"".join(parts)


def refusal(status: int, body: bytes) -> QuantchatError:
    """The exception a worker's (or the controller's) JSON error response stands for."""
    try:
        data = json.loads(body)
        err = data.get("error") or {}
        message, param, kind = str(err.get("message") or ""), err.get("param"), data.get("kind")
    except (ValueError, AttributeError):
        message, param, kind = body[:200].decode("utf-8", "replace"), None, None
    message = message or f"HTTP {status}"
    cls = ERRORS_BY_KIND.get(kind or "")
    if cls is None:
        cls = {404: UnknownModelError, 429: QueueFullError, 503: UnavailableError}.get(status)
        if cls is None:
            cls = BadRequestError if status in (400, 413, 422) else UnavailableError
    if cls is BadRequestError:
        return BadRequestError(message, param if isinstance(param, str) else None)
    return cls(message)


class ControllerBackend:
    """``api.Backend`` over a controller and its workers (``quantchat api``).

    ``start()`` begins refreshing the worker list in the background (for ``ready()``, the health
    probe); ``close()`` stops it. HTTP to the controller and the workers sends the admin secret, over
    mutual TLS when ``ssl_context`` holds the fleet CA and this server's certificate.
    """

    def __init__(self, controller_url: str, secret: SecretSource | str, retries: int = 3, refresh_s: float = 2.0,
                 connect_timeout: float = 5.0, read_timeout: float | None = 600.0,
                 log: Callable[[str], None] = lambda s: None, ssl_context: ssl.SSLContext | None = None) -> None:
        if not secret:
            raise QuantchatError("the API server needs the controller's admin secret")
        self.url = controller_url.rstrip("/")
        self.secret = secret if isinstance(secret, SecretSource) else SecretSource(secret, name="admin secret")
        self.ssl_context = ssl_context
        self.retries = max(1, retries)
        self.refresh_s = refresh_s
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.log = log
        self._client = None
        self._client_loop = None
        self._session = None  # aiohttp, for the token streams from workers
        self._session_loop = None
        self._workers: list[dict[str, Any]] = []
        self._seen_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- plumbing ---------------------------------------------------------------------------
    def client(self):
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(
                verify=self.ssl_context if self.ssl_context is not None else True,
                timeout=httpx.Timeout(connect=self.connect_timeout, read=self.read_timeout,
                                      write=self.connect_timeout, pool=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
            self._client_loop = loop
        return self._client

    def stream_session(self) -> aiohttp.ClientSession:
        """The aiohttp session the token streams from workers go through: per streamed token it takes
        about a third of httpx's CPU time, which on a small machine the workers share."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout,
                                              sock_read=self.read_timeout),
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0,
                                               ssl=self.ssl_context if self.ssl_context is not None else True))
            self._session_loop = loop
        return self._session

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _controller(self, method: str, path: str, **kw) -> Any:
        try:
            r = await self.client().request(method, self.url + path, headers=self.secret.header(), **kw)
        except httpx.HTTPError as e:
            raise UnavailableError(f"the controller {self.url} is unreachable ({type(e).__name__})") from None
        if r.status_code == 401:
            raise UnavailableError("the controller refused the admin secret (check --admin-secret-file / --secret)")
        if r.status_code != 200:
            raise refusal(r.status_code, r.content)
        return r.json()

    def _remember(self, workers: list[dict[str, Any]]) -> None:
        self._workers = workers
        self._seen_at = time.monotonic()

    async def workers(self) -> list[dict[str, Any]]:
        workers = (await self._controller("GET", "/workers"))["workers"]
        self._remember(workers)
        return workers

    async def _dispatch(self, model: str | None, tried: list[str]) -> str:
        return (await self._controller("POST", "/dispatch", json={"model": model or None, "exclude": tried}))["address"]

    async def _report(self, address: str, why: str, retrying: bool = True) -> None:
        self.log(f"worker {address} failed ({why})" + ("; trying another" if retrying else ""))
        try:
            await self._controller("POST", "/report_failure", json={"address": address})
        except QuantchatError:
            pass

    # -- background refresh for ready() -----------------------------------------------------
    def start(self) -> ControllerBackend:
        self._thread = threading.Thread(target=self._refresh_loop, name="quantchat-workers", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.connect_timeout + 1)

    def _refresh_loop(self) -> None:
        warned = False
        verify = self.ssl_context if self.ssl_context is not None else True
        with httpx.Client(timeout=self.connect_timeout, verify=verify) as c:
            while True:
                try:
                    r = c.get(self.url + "/workers", headers=self.secret.header())
                    r.raise_for_status()
                    self._remember(r.json()["workers"])
                    if warned:
                        self.log(f"the controller {self.url} answers again")
                    warned = False
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    self._workers = []
                    if not warned:
                        self.log(f"cannot list workers from the controller {self.url}: {type(e).__name__}: {e}")
                    warned = True
                if self._stop.wait(self.refresh_s):
                    return

    # -- Backend ----------------------------------------------------------------------------
    def ready(self) -> bool:
        return bool(self._workers) and time.monotonic() - self._seen_at < max(10.0, 3 * self.refresh_s)

    async def models(self) -> list[dict[str, Any]]:
        by_model: dict[str, dict[str, Any]] = {}
        for w in await self.workers():
            m = by_model.setdefault(w["model"], {"id": w["model"], "created": w.get("created", 0),
                                                 "max_model_len": w["max_model_len"]})
            m["created"] = min(m["created"], w.get("created", 0)) or m["created"]
            m["max_model_len"] = min(m["max_model_len"], w["max_model_len"])
        return sorted(by_model.values(), key=lambda m: m["id"])

    async def stats(self) -> dict[str, Any]:
        try:
            workers = await self.workers()
        except QuantchatError:
            return {"workers": 0}
        n = len(workers)
        return {
            "workers": n,
            "queue_length": sum(w.get("queue_length", 0) for w in workers),
            "running_batch": sum(w.get("running_batch", 0) for w in workers),
            "max_batch": sum(w.get("max_batch", 0) for w in workers),
            "kv_cache_usage": sum(w.get("kv_cache_usage", 0.0) for w in workers) / n if n else 0.0,
            "requests_total": sum(w.get("requests_total", 0) for w in workers),
        }

    async def _open(self, model: str | None, payload: dict[str, Any], tried: list[str]):
        """A worker's 200 response to /worker/generate (streaming), retrying elsewhere on failures."""
        session = self.stream_session()
        params = {"model": model} if model else None
        last = "no worker tried"
        while len(tried) < self.retries:
            try:
                address = await self._dispatch(model, tried)
            except UnavailableError as e:
                if tried:  # every worker of the model has failed us
                    raise UnavailableError(f"no worker could take the request (last failure: {last})") from None
                raise e
            tried.append(address)
            try:
                resp = await session.post(address + "/worker/generate", json=payload, params=params,
                                          headers=self.secret.header())
            except STREAM_ERRORS as e:
                last = f"{address}: {type(e).__name__}: {e}"
                await self._report(address, f"{type(e).__name__}: {e}")
                continue
            if resp.status == 200:
                return resp, address
            try:
                body = await resp.read()
            except STREAM_ERRORS:
                body = b""
            finally:
                resp.close()
            if resp.status in REFUSALS:
                raise refusal(resp.status, body)
            last = f"{address}: HTTP {resp.status} {body[:200].decode('utf-8', 'replace')}"
            await self._report(address, f"HTTP {resp.status}")
        raise UnavailableError(f"no worker could take the request after {self.retries} tries (last failure: {last})")

    async def generate(self, model: str | None, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        payload = req.model_dump()
        tried: list[str] = []
        resp, address = await self._open(model, payload, tried)
        return WorkerStream(self, model, payload, tried, resp, address)

    async def _call(self, model: str | None, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A small JSON request to a worker of ``model`` (tokenize, detokenize), with retries."""
        tried: list[str] = []
        last = "no worker tried"
        for _ in range(self.retries):
            try:
                address = await self._dispatch(model, tried)
            except UnavailableError:
                if tried:
                    raise UnavailableError(f"no worker could take the request (last failure: {last})") from None
                raise
            tried.append(address)
            try:
                r = await self.client().post(address + path, json=body, params={"model": model} if model else None,
                                             headers=self.secret.header())
            except httpx.HTTPError as e:
                last = f"{address}: {type(e).__name__}: {e}"
                await self._report(address, last)
                continue
            if r.status_code == 200:
                return r.json()
            if r.status_code in REFUSALS:
                raise refusal(r.status_code, r.content)
            last = f"{address}: HTTP {r.status_code}"
            await self._report(address, last)
        raise UnavailableError(f"no worker could take the request (last failure: {last})")

    async def tokenize(self, model: str | None, req: TokenizeRequest) -> dict[str, Any]:
        return await self._call(model, "/worker/tokenize", req.model_dump(exclude_none=True) | {"model": model})

    async def detokenize(self, model: str | None, tokens: list[int]) -> str:
        return (await self._call(model, "/worker/detokenize", {"tokens": tokens}))["prompt"]


class WorkerBroken(Exception):
    pass


class WorkerStream:
    """One sequence's events from a worker. A failure before the first event moves the request to
    another worker; after it, the stream ends with an error event. ``aclose()`` ends the worker's
    sequence (by closing the HTTP response) even when the stream was never iterated."""

    def __init__(self, backend: ControllerBackend, model: str | None, payload: dict[str, Any], tried: list[str],
                 resp, address: str) -> None:
        self.backend, self.model, self.payload, self.tried = backend, model, payload, tried
        self.resp, self.address = resp, address
        self._gen = self._events()

    def __aiter__(self) -> WorkerStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        try:
            await self._gen.aclose()
        except RuntimeError:  # being iterated by a task that is being cancelled
            pass
        finally:
            self.resp.close()  # drops the connection: the worker cancels the sequence

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        started = False
        try:
            while True:
                try:
                    async for line in stream_lines(self.resp.content):  # one JSON event per line
                        if not line.strip():
                            continue
                        ev = json.loads(line)
                        if not started and ev.get("error"):  # the worker is broken (its scheduler died)
                            raise WorkerBroken(str(ev["error"]))
                        started = True
                        yield ev
                        if ev.get("finish_reason"):
                            return
                    raise aiohttp.ClientPayloadError("the worker ended the stream before the last event")
                except (*STREAM_ERRORS, ValueError, WorkerBroken) as e:
                    self.resp.close()
                    why = f"{type(e).__name__}: {e}"
                    retry = not started and len(self.tried) < self.backend.retries
                    if not isinstance(e, (ValueError, WorkerBroken)) or retry:  # gone: the controller drops it now
                        await self.backend._report(self.address, why, retrying=retry)
                    if not retry:
                        yield error_event(f"the worker {self.address} failed during generation ({why})")
                        return
                    try:
                        self.resp, self.address = await self.backend._open(self.model, self.payload, self.tried)
                    except QuantchatError as e2:
                        yield error_event(str(e2))
                        return
        finally:
            self.resp.close()
