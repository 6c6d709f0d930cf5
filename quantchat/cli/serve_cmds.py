"""``quantchat serve``: the OpenAI-compatible API, the web chat page and one worker, in one process."""

from __future__ import annotations

import argparse
import ipaddress
import os
import threading
from pathlib import Path

from quantchat.cli.common import add_model_args, status
from quantchat.errors import QuantchatError

DEFAULT_SERVE_QUANT = "int4-asym"
DEFAULT_SERVE_GROUP = 32


def read_api_keys(args: argparse.Namespace):
    """The client keys (a reloadable ``KeyRing``): --api-key (repeatable), $QUANTCHAT_API_KEY, and
    --api-key-file (one a line, plain or ``sha256:HEX``; read again on change or SIGHUP)."""
    from quantchat.serving.keys import KeyRing

    keys = [k.strip() for k in (args.api_key or []) if k.strip()]
    env = os.environ.get("QUANTCHAT_API_KEY", "").strip()
    if env:
        keys.append(env)
    return KeyRing(keys, path=args.api_key_file or None, grace_s=args.key_grace, name="API key", log=status)


def add_tls_args(p: argparse.ArgumentParser, mutual: bool) -> None:
    g = p.add_argument_group("TLS")
    g.add_argument("--tls-cert", default=None, help="this server's certificate (PEM): serve HTTPS")
    g.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    if mutual:
        g.add_argument("--tls-ca", default=None,
                       help="the fleet CA (quantchat deploy certs): mutual TLS between API, controller and workers "
                            "(peers must show a certificate it signed; this process shows --tls-cert)")


def tls_from_args(args: argparse.Namespace):
    from quantchat.serving.tls import TLSConfig

    return TLSConfig(args.tls_cert, args.tls_key, getattr(args, "tls_ca", None))


def scheme(tls) -> str:
    return "https" if tls.server else "http"


def warn_plain_http(host: str, tls, what: str) -> None:
    if not tls.server and not is_loopback(host):
        status(f"warning: {what} serves plain HTTP on {host}: requests, keys and answers cross the network "
               "unencrypted; plain HTTP is for one machine (give --tls-cert/--tls-key, and --tls-ca for mutual TLS "
               "inside the fleet)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_server_args(p: argparse.ArgumentParser, port: int) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=port)
    g.add_argument("--api-key", action="append", default=[],
                   help="require this API key (repeatable; also $QUANTCHAT_API_KEY)")
    g.add_argument("--api-key-file", default=None,
                   help="file with API keys, one a line: plain, or sha256:HEX (quantchat deploy hash-key); read "
                        "again when it changes or on SIGHUP")
    g.add_argument("--key-grace", type=float, default=300.0, metavar="SECONDS",
                   help="a key removed from a key file keeps working this long (rotation; default 300)")
    g.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body (413 above)")
    g.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])


def add_worker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV slots, default 8)")
    g.add_argument("--cache-slots", type=int, default=None,
                   help="extra KV slots that only keep finished conversations for prefix reuse, so their next "
                        "turn (or a repeated prompt) starts from the cache even when every batch slot is busy "
                        "(default: as many as --max-batch; 0: none)")
    g.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (429 above)")
    g.add_argument("--served-model-name", default=None, help="model id clients use (default: the model's name)")
    g.add_argument("--template", default=None, help="chat template: built-in name or jinja file")


def check_worker_args(args: argparse.Namespace) -> int:
    """Refuse bad batching options before anything starts; returns the number of cache slots."""
    cache_slots = args.max_batch if args.cache_slots is None else args.cache_slots
    if args.max_batch < 1 or args.max_queue < 0 or cache_slots < 0:
        raise QuantchatError("--max-batch must be >= 1, --max-queue and --cache-slots >= 0")
    return cache_slots


def build_worker(args: argparse.Namespace, progress=status):
    """Load the model of ``args`` and wrap it in a ``Worker``."""
    import torch

    from quantchat.benchmark.measure import kv_cache_bytes
    from quantchat.engine.build import load_engine
    from quantchat.serving.worker import Worker

    cache_slots = check_worker_args(args)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    quant = args.quant
    loaded = load_engine(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                         max_batch=args.max_batch + cache_slots, progress=progress, compile=args.compile,
                         quant=quant, group_size=args.group_size, kv_cache_dtype=args.kv_cache_dtype)
    template = args.template
    if template is not None and Path(template).is_file():
        template = Path(template).read_text(encoding="utf-8")
    name = args.served_model_name or loaded.source.name
    if quant and quant != "none" and not args.served_model_name:
        name = f"{name}-{quant}"
    worker = Worker(loaded.engine, name, max_queue=args.max_queue, template=template, max_batch=args.max_batch)
    model = loaded.engine.model
    kv_dtype = next((str(b.dtype).removeprefix("torch.") for n, b in model.named_buffers() if "k_cache" in n), "?")
    progress(f"loaded {loaded.source.name} as '{name}' ({quant or 'as stored'}, {loaded.engine.device}) "
             f"in {loaded.load_s:.1f} s; {args.max_batch} batch + {cache_slots} cache slots x "
             f"{loaded.engine.max_seq_len} tokens "
             f"(KV cache {kv_dtype}, {kv_cache_bytes(model) / 2**20:.0f} MiB)")
    return worker


def run_uvicorn(app, host: str, port: int, log_level: str, tls=None, require_client_cert: bool = False,
                rings=(), header_timeout_s: float = 10.0) -> None:
    """Serve ``app``; HTTPS with ``tls`` (a ``TLSConfig`` with a certificate), asking clients for a certificate
    signed by its CA with ``require_client_cert``; ``rings`` (KeyRings) are read again on SIGHUP. A connection
    that has not sent a whole request header ``header_timeout_s`` after it opened (or after its request began)
    is closed; idle keep-alive connections after 5 s."""
    import uvicorn

    from quantchat.serving.keys import install_sighup
    from quantchat.serving.slow_clients import with_header_timeout

    install_sighup(rings, status)
    ssl_kw = tls.uvicorn_kwargs(require_client_cert) if tls is not None else {}
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3,
                http=with_header_timeout(header_timeout_s), **ssl_kw)


def cmd_serve(args: argparse.Namespace) -> int:
    from quantchat.serving.backend import LocalBackend
    from quantchat.serving.openai.app import create_app

    keys = read_api_keys(args)
    tls = tls_from_args(args)
    check_worker_args(args)
    warn_plain_http(args.host, tls, "quantchat serve")
    if not is_loopback(args.host) and not keys:
        status(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it "
               "(set --api-key or --api-key-file)")
    if args.quant is None:  # INT4 by default; group 32 keeps a Q4_1 source's weights exactly
        args.quant = DEFAULT_SERVE_QUANT
        args.group_size = args.group_size or DEFAULT_SERVE_GROUP
    backend = LocalBackend()
    app = create_app(backend, api_keys=keys, max_body_bytes=args.max_body_bytes, web=not args.no_web)

    def load() -> None:
        try:
            backend.worker = build_worker(args)
        except Exception as e:  # shown by /health and every request (503)
            backend.load_error = f"the model failed to load: {e}"
            status(f"quantchat: error: {e}")

    threading.Thread(target=load, name="quantchat-load", daemon=True).start()
    status(f"quantchat serving on {scheme(tls)}://{args.host}:{args.port}/ (OpenAI API at /v1, chat page at /)"
           + (" — API key required" if keys else ""))
    try:
        run_uvicorn(app, args.host, args.port, args.log_level, tls=tls, rings=[keys])
    finally:
        if backend.worker is not None:
            backend.worker.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API + web chat page + one worker, in one process")
    add_model_args(p, max_seq_len=2048)
    add_server_args(p, port=8000)
    add_tls_args(p, mutual=False)
    add_worker_args(p)
    p.add_argument("--no-web", action="store_true", help="do not serve the chat page at /")
    p.set_defaults(func=cmd_serve, quant=None)
