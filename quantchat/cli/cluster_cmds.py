"""``quantchat controller`` / ``quantchat worker`` / ``quantchat api``: serving as separate processes.

One controller, any number of workers (each its own model, port or machine) and any number of API
servers. Workers register with the controller and send heartbeats; the API server asks the controller
which worker should take each request. Everything between them needs one shared secret
(``--secret``, ``--secret-file`` or ``$QUANTCHAT_SECRET``); the API's clients use API keys as usual.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

from quantchat.cli.common import add_model_args, status
from quantchat.cli.serve_cmds import (DEFAULT_SERVE_GROUP, DEFAULT_SERVE_QUANT, add_server_args, add_worker_args,
                                      build_worker, check_worker_args, is_loopback, read_api_keys, run_uvicorn)
from quantchat.errors import QuantchatError

SECRET_ENV = "QUANTCHAT_SECRET"
DEFAULT_CONTROLLER_PORT = 21001
DEFAULT_WORKER_PORT = 21002
LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


def read_secret(args: argparse.Namespace) -> str:
    """The cluster's shared secret: --secret, else --secret-file (first line), else $QUANTCHAT_SECRET."""
    secret = (args.secret or "").strip()
    if not secret and args.secret_file:
        try:
            lines = Path(args.secret_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise QuantchatError(f"{args.secret_file}: cannot read the shared secret ({e})") from None
        secret = next((s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")), "")
        if not secret:
            raise QuantchatError(f"{args.secret_file}: no secret in the file")
    if not secret:
        secret = os.environ.get(SECRET_ENV, "").strip()
    if not secret:
        raise QuantchatError(
            f"{args.command} needs the cluster's shared secret: give --secret-file FILE, --secret S or "
            f"${SECRET_ENV} (the same on the controller, the workers and the API servers); make one with "
            "python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    if len(secret) < 16:
        status("warning: the shared secret is short (under 16 characters); use a long random one")
    return secret


def add_secret_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--secret", default=None,
                   help=f"shared secret of the controller, workers and API servers (visible in ps: prefer "
                        f"--secret-file or ${SECRET_ENV})")
    g.add_argument("--secret-file", default=None, help="file holding the shared secret (first line)")


def add_bind_args(p: argparse.ArgumentParser, port: int) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=port)
    g.add_argument("--log-level", default="warning", choices=LOG_LEVELS)


def check_url(url: str, what: str) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise QuantchatError(f"{what} must be an http:// or https:// URL, not {url!r}")
    return url.rstrip("/")


# -- controller ---------------------------------------------------------------------------------
def cmd_controller(args: argparse.Namespace) -> int:
    from quantchat.serving.controller import DEFAULT_ALLOW, AddressPolicy, Controller, create_controller_app

    secret = read_secret(args)
    patterns = args.allow_worker or list(DEFAULT_ALLOW)
    policy = AddressPolicy(patterns)
    controller = Controller(expiry=args.heartbeat_expiry, policy=policy, log=status)
    app = create_controller_app(controller, secret)
    status(f"quantchat controller on http://{args.host}:{args.port}/ (workers allowed from: {', '.join(patterns)}; "
           f"heartbeat expiry {args.heartbeat_expiry:g} s)")
    run_uvicorn(app, args.host, args.port, args.log_level)
    return 0


# -- worker -------------------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    from quantchat.serving.backend import LocalBackend
    from quantchat.serving.worker_server import Registrar, create_worker_app

    secret = read_secret(args)
    controller = check_url(args.controller, "--controller")
    check_worker_args(args)
    if args.worker_address:
        address = check_url(args.worker_address, "--worker-address")
    elif args.host in ("0.0.0.0", "::", ""):
        raise QuantchatError(f"binding {args.host!r}: give --worker-address, the URL the API servers reach this "
                             "worker at (e.g. http://$POD_IP:21002)")
    else:
        address = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    if args.heartbeat_interval <= 0:
        raise QuantchatError("--heartbeat-interval must be positive")
    if args.quant is None:  # the same default as quantchat serve
        args.quant = DEFAULT_SERVE_QUANT
        args.group_size = args.group_size or DEFAULT_SERVE_GROUP
    backend = LocalBackend()

    def info() -> dict:
        w = backend.worker
        return {"address": address} if w is None else {
            "address": address, "model": w.model_name, "max_model_len": w.max_seq_len, "created": w.created}

    def describe() -> dict | None:
        return info() if backend.worker is not None else None

    def load_status() -> dict:
        return backend.worker.status() if backend.worker is not None else {}

    registrar = Registrar(controller, secret, describe, load_status, interval=args.heartbeat_interval, log=status)

    def shutdown() -> None:  # on SIGTERM too (uvicorn's graceful shutdown, before it re-raises the signal)
        registrar.stop(unregister=True)
        if backend.worker is not None:
            backend.worker.close()

    app = create_worker_app(backend, secret, info=info, on_shutdown=[shutdown])

    def load() -> None:
        try:
            backend.worker = build_worker(args)
        except Exception as e:  # shown by /health (503); never registered
            backend.load_error = f"the model failed to load: {e}"
            status(f"quantchat: error: {e}")

    threading.Thread(target=load, name="quantchat-load", daemon=True).start()
    registrar.start()
    status(f"quantchat worker on http://{args.host}:{args.port}/ registering as {address} with {controller}")
    run_uvicorn(app, args.host, args.port, args.log_level)
    return 0


# -- api ----------------------------------------------------------------------------------------
def cmd_api(args: argparse.Namespace) -> int:
    from quantchat.serving.openai.app import create_app
    from quantchat.serving.controller import ControllerBackend

    secret = read_secret(args)
    controller = check_url(args.controller, "--controller")
    keys = read_api_keys(args)
    if not is_loopback(args.host) and not keys:
        status(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it "
               "(set --api-key or --api-key-file)")
    if args.retries < 1:
        raise QuantchatError("--retries must be at least 1")
    backend = ControllerBackend(controller, secret, retries=args.retries, log=status).start()
    app = create_app(backend, api_keys=keys, max_body_bytes=args.max_body_bytes, web=not args.no_web)
    status(f"quantchat API on http://{args.host}:{args.port}/ (OpenAI API at /v1, chat page at /) over the "
           f"controller {controller}" + (" — API key required" if keys else ""))
    try:
        run_uvicorn(app, args.host, args.port, args.log_level)
    finally:
        backend.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("controller", help="cluster controller: tracks workers, picks one for each request")
    add_bind_args(p, DEFAULT_CONTROLLER_PORT)
    add_secret_args(p)
    p.add_argument("--heartbeat-expiry", type=float, default=20.0,
                   help="drop a worker after this many seconds without a heartbeat (default 20)")
    p.add_argument("--allow-worker", action="append", default=[], metavar="PATTERN",
                   help="addresses workers may register (repeatable): CIDR (10.0.0.0/8), address, host:port, "
                        "host name pattern (worker-*.svc:21002); default: loopback only (127.0.0.0/8, ::1, "
                        "localhost)")
    p.set_defaults(func=cmd_controller)

    p = sub.add_parser("worker", help="cluster worker: one model, registered with a controller")
    add_model_args(p, max_seq_len=2048)
    add_worker_args(p)
    add_bind_args(p, DEFAULT_WORKER_PORT)
    add_secret_args(p)
    p.add_argument("--controller", required=True, help="the controller's URL (http://host:21001)")
    p.add_argument("--worker-address", default=None,
                   help="URL the API servers reach this worker at, sent to the controller "
                        "(default: http://HOST:PORT)")
    p.add_argument("--heartbeat-interval", type=float, default=5.0,
                   help="seconds between heartbeats (default 5; keep well under the controller's expiry)")
    p.set_defaults(func=cmd_worker, quant=None)

    p = sub.add_parser("api", help="OpenAI-compatible API + web chat page over a controller's workers")
    add_server_args(p, port=8000)
    add_secret_args(p)
    p.add_argument("--controller", required=True, help="the controller's URL (http://host:21001)")
    p.add_argument("--retries", type=int, default=3,
                   help="workers tried for a request that fails before its first token (default 3)")
    p.add_argument("--no-web", action="store_true", help="do not serve the chat page at /")
    p.set_defaults(func=cmd_api)
