"""The OpenAI-compatible HTTP API (and the web chat page) over a ``Backend``.

Routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (streaming as SSE),
``/tokenize``, ``/detokenize``, ``/health``, ``/metrics`` (Prometheus text), ``/openapi.json`` (the
schema), ``/`` (chat page). Every route but ``/health``, ``/openapi.json`` and the page's files needs
an API key when keys are set.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from quantchat import __version__
from quantchat.errors import UnknownModelError
from quantchat.serving.backend import Backend
from quantchat.serving.keys import KeyRing
from quantchat.serving.metrics import Metrics
from quantchat.serving.middleware import BODY_TIMEOUT_S, AuthAndCount, BodyLimit
from quantchat.serving.openai.errors import error_response, install_error_handlers
from quantchat.serving.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ListedModel,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from quantchat.serving.openai.serving_chat import create_chat_completion
from quantchat.serving.openai.serving_completion import create_completion

DEFAULT_MAX_BODY = 4 * 1024 * 1024
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png"}


def create_app(backend: Backend, api_keys: KeyRing | set[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               web: bool = True, title: str = "quantchat", body_timeout_s: float | None = BODY_TIMEOUT_S) -> FastAPI:
    """The API app; ``api_keys``: the client keys (a ``KeyRing``, reloadable, or a set of plain keys); a request
    body that stalls ``body_timeout_s`` between chunks gets 408."""
    # the schema at /openapi.json (public, like /health); no docs pages: they load their scripts from a CDN
    app = FastAPI(title=title, version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    metrics = Metrics()
    keys = api_keys if isinstance(api_keys, KeyRing) else KeyRing(api_keys or (), name="API key")
    app.state.backend, app.state.metrics = backend, metrics

    install_error_handlers(app)

    @app.head("/health", include_in_schema=False)
    @app.get("/health")
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
        return JSONResponse(ModelList(data=[
            ListedModel(id=m["id"], created=m.get("created", 0), max_model_len=m.get("max_model_len"))
            for m in models]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for m in await backend.models():
            if m["id"] == model_id:
                return JSONResponse(ModelCard(id=m["id"], created=m.get("created", 0)).model_dump())
        raise UnknownModelError(f"The model '{model_id}' does not exist")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await backend.tokenize(body.model, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return JSONResponse(DetokenizeResponse(prompt=await backend.detokenize(body.model, body.tokens)).model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(body, request, backend, metrics)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(body, request, backend, metrics)

    if web:
        install_web(app)
    app.add_middleware(AuthAndCount, keys=keys, metrics=metrics, web=web)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    return app


def install_web(app: FastAPI) -> None:
    """Serve the chat page and its assets from the package (no CDN, no build step)."""
    web_dir = resources.files("quantchat.serving") / "web"

    @app.head("/", include_in_schema=False, response_class=HTMLResponse)
    @app.get("/", response_class=HTMLResponse)
    async def index():
        page = web_dir / "index.html"
        if not page.is_file():
            return HTMLResponse("<h1>quantchat</h1><p>The chat page is not installed.</p>")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.head("/static/{name}", include_in_schema=False)
    @app.get("/static/{name}")
    async def static(name: str):
        f = web_dir / name
        if "/" in name or name.startswith(".") or not f.is_file():
            return error_response(404, f"no such file: {name}", "invalid_request_error")
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        return Response(f.read_bytes(), media_type=STATIC_TYPES.get(suffix, "application/octet-stream"))
