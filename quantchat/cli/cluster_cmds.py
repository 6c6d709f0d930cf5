"""``quantchat controller`` / ``quantchat worker`` / ``quantchat api``: serving as separate processes.

One controller, any number of workers (each its own model, port or machine) and any number of API
servers. Workers register with the controller and send heartbeats; the API server asks the controller
which worker should take each request.

Secrets per role: workers register with the worker secret (``--worker-secret-file`` or
``$QUANTCHAT_WORKER_SECRET``); API servers talk to the controller and the workers with the admin secret
(``--admin-secret-file`` or ``$QUANTCHAT_ADMIN_SECRET``); the API's clients use API keys. Where a role's
own secret is not given, the one shared secret of earlier versions stands in (``--secret``,
``--secret-file`` or ``$QUANTCHAT_SECRET``). Secret files are read again when they change (or on SIGHUP).
With ``--tls-ca`` and each role's own certificate the hops use mutual TLS (``quantchat deploy certs``).
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

from quantchat.cli.common import add_model_args, status
from quantchat.cli.serve_cmds import (DEFAULT_SERVE_GROUP, DEFAULT_SERVE_QUANT, add_server_args, add_tls_args,
                                      add_worker_args, build_worker, check_worker_args, is_loopback, read_api_keys,
                                      run_uvicorn, scheme, tls_from_args, warn_plain_http)
from quantchat.errors import QuantchatError

SECRET_ENV = "QUANTCHAT_SECRET"
ROLE_ENV = {"worker": "QUANTCHAT_WORKER_SECRET", "admin": "QUANTCHAT_ADMIN_SECRET"}
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
            f"{args.command} needs the cluster's secrets: per role --worker-secret-file / --admin-secret-file "
            f"(or $QUANTCHAT_WORKER_SECRET / $QUANTCHAT_ADMIN_SECRET), or one shared secret for all: "
            f"--secret-file FILE, --secret S or ${SECRET_ENV} (the same on the controller, the workers and the API "
            "servers); make one with quantchat deploy keygen")
    if len(secret) < 16:
        status("warning: the shared secret is short (under 16 characters); use a long random one")
    return secret


def role_secret(args: argparse.Namespace, role: str) -> tuple[str | None, str | None]:
    """``(value, file)`` of a role's secret ("worker": registration, "admin": the API servers'): its own
    --ROLE-secret-file or $QUANTCHAT_ROLE_SECRET, else the shared secret (read_secret)."""
    path = getattr(args, f"{role}_secret_file", None)
    if path:
        return None, path
    env = os.environ.get(ROLE_ENV[role], "").strip()
    if env:
        return env, None
    if not (args.secret or "").strip() and args.secret_file:
        read_secret(args)  # checks the file now (clear error at start)
        return None, args.secret_file
    return read_secret(args), None


def receiving_ring(args: argparse.Namespace, role: str):
    """The KeyRing of the keys a role's receivers accept (several a file, plain or sha256:HEX)."""
    from quantchat.serving.keys import KeyRing

    value, path = role_secret(args, role)
    return KeyRing([value] if value else [], path=path, grace_s=args.key_grace, name=f"{role} secret", log=status)


def sending_secret(args: argparse.Namespace, role: str):
    from quantchat.serving.keys import SecretSource

    value, path = role_secret(args, role)
    return SecretSource(value, path, name=f"{role} secret")


def add_secret_args(p: argparse.ArgumentParser, roles: tuple[str, ...]) -> None:
    g = p.add_argument_group("cluster secrets")
    if "worker" in roles:
        g.add_argument("--worker-secret-file", default=None,
                       help="the workers' registration secret (also $QUANTCHAT_WORKER_SECRET); a receiver's file "
                            "may list several, plain or sha256:HEX")
    if "admin" in roles:
        g.add_argument("--admin-secret-file", default=None,
                       help="the admin secret API servers send to the controller and the workers (also "
                            "$QUANTCHAT_ADMIN_SECRET)")
    g.add_argument("--secret", default=None,
                   help=f"one shared secret for every role not given its own (visible in ps: prefer "
                        f"--secret-file or ${SECRET_ENV})")
    g.add_argument("--secret-file", default=None, help="file holding the shared secret (first line)")
    if not any(a.dest == "key_grace" for a in p._actions):
        g.add_argument("--key-grace", type=float, default=300.0, metavar="SECONDS",
                       help="a secret removed from its file keeps working this long (rotation; default 300)")


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

    workers, admin = receiving_ring(args, "worker"), receiving_ring(args, "admin")
    tls = tls_from_args(args)
    patterns = args.allow_worker or list(DEFAULT_ALLOW)
    policy = AddressPolicy(patterns)
    controller = Controller(expiry=args.heartbeat_expiry, policy=policy, log=status)
    app = create_controller_app(controller, workers, admin)
    warn_plain_http(args.host, tls, "the controller")
    status(f"quantchat controller on {scheme(tls)}://{args.host}:{args.port}/"
           f"{' (mutual TLS)' if tls.ca else ''} (workers allowed from: {', '.join(patterns)}; "
           f"heartbeat expiry {args.heartbeat_expiry:g} s)")
    run_uvicorn(app, args.host, args.port, args.log_level, tls=tls, require_client_cert=True,
                rings=[workers, admin])
    return 0


# -- worker -------------------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    from quantchat.serving.backend import LocalBackend
    from quantchat.serving.worker_server import Registrar, create_worker_app

    sends, accepts = sending_secret(args, "worker"), receiving_ring(args, "admin")
    tls = tls_from_args(args)
    controller = check_url(args.controller, "--controller")
    check_worker_args(args)
    if args.worker_address:
        address = check_url(args.worker_address, "--worker-address")
    elif args.host in ("0.0.0.0", "::", ""):
        raise QuantchatError(f"binding {args.host!r}: give --worker-address, the URL the API servers reach this "
                             f"worker at (e.g. {scheme(tls)}://$POD_IP:21002)")
    else:
        address = f"{scheme(tls)}://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
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

    registrar = Registrar(controller, sends, describe, load_status, interval=args.heartbeat_interval, log=status,
                          ssl_context=tls.client_context())

    def shutdown() -> None:  # on SIGTERM too (uvicorn's graceful shutdown, before it re-raises the signal)
        registrar.stop(unregister=True)
        if backend.worker is not None:
            backend.worker.close()

    app = create_worker_app(backend, accepts, info=info, on_shutdown=[shutdown])

    def load() -> None:
        try:
            backend.worker = build_worker(args)
        except Exception as e:  # shown by /health (503); never registered
            backend.load_error = f"the model failed to load: {e}"
            status(f"quantchat: error: {e}")

    threading.Thread(target=load, name="quantchat-load", daemon=True).start()
    registrar.start()
    warn_plain_http(args.host, tls, "the worker")
    status(f"quantchat worker on {scheme(tls)}://{args.host}:{args.port}/{' (mutual TLS)' if tls.ca else ''} "
           f"registering as {address} with {controller}")
    run_uvicorn(app, args.host, args.port, args.log_level, tls=tls, require_client_cert=True, rings=[accepts])
    return 0


# -- api ----------------------------------------------------------------------------------------
def cmd_api(args: argparse.Namespace) -> int:
    from quantchat.serving.controller import ControllerBackend
    from quantchat.serving.openai.app import create_app
    from quantchat.serving.tls import TLSConfig

    secret = sending_secret(args, "admin")
    tls = tls_from_args(args)
    fleet = TLSConfig(args.fleet_cert or tls.cert, args.fleet_key or tls.key, tls.ca)
    if tls.ca and not fleet.cert:
        raise QuantchatError("--tls-ca (mutual TLS with the fleet) needs a certificate to show it: --tls-cert / "
                             "--tls-key, or --fleet-cert / --fleet-key")
    controller = check_url(args.controller, "--controller")
    keys = read_api_keys(args)
    warn_plain_http(args.host, tls, "the API server")
    if not is_loopback(args.host) and not keys:
        status(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it "
               "(set --api-key or --api-key-file)")
    if args.retries < 1:
        raise QuantchatError("--retries must be at least 1")
    backend = ControllerBackend(controller, secret, retries=args.retries, log=status,
                                ssl_context=fleet.client_context()).start()
    app = create_app(backend, api_keys=keys, max_body_bytes=args.max_body_bytes, web=not args.no_web)
    status(f"quantchat API on {scheme(tls)}://{args.host}:{args.port}/ (OpenAI API at /v1, chat page at /) over the "
           f"controller {controller}" + (" — API key required" if keys else ""))
    try:
        run_uvicorn(app, args.host, args.port, args.log_level, tls=tls, require_client_cert=False, rings=[keys])
    finally:
        backend.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("controller", help="cluster controller: tracks workers, picks one for each request")
    add_bind_args(p, DEFAULT_CONTROLLER_PORT)
    add_tls_args(p, mutual=True)
    add_secret_args(p, ("worker", "admin"))
    p.add_argument("--heartbeat-expiry", type=float, default=20.0,
                   help="drop a worker after this many seconds without a heartbeat (default 20)")
    p.add_argument("--allow-worker", action="append", default=[], metavar="PATTERN",
                   help="addresses workers may register (repeatable): CIDR (10.0.0.0/8), address, host:port, "
                        "host name pattern (worker-*.svc:21002); default: loopback and private ranges "
                        "(127.0.0.0/8, ::1, localhost, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7)")
    p.set_defaults(func=cmd_controller)

    p = sub.add_parser("worker", help="cluster worker: one model, registered with a controller")
    add_model_args(p, max_seq_len=2048)
    add_worker_args(p)
    add_bind_args(p, DEFAULT_WORKER_PORT)
    add_tls_args(p, mutual=True)
    add_secret_args(p, ("worker", "admin"))
    p.add_argument("--controller", required=True, help="the controller's URL (http://host:21001)")
    p.add_argument("--worker-address", default=None,
                   help="URL the API servers reach this worker at, sent to the controller "
                        "(default: http://HOST:PORT)")
    p.add_argument("--heartbeat-interval", type=float, default=5.0,
                   help="seconds between heartbeats (default 5; keep well under the controller's expiry)")
    p.set_defaults(func=cmd_worker, quant=None)

    p = sub.add_parser("api", help="OpenAI-compatible API + web chat page over a controller's workers")
    add_server_args(p, port=8000)
    add_tls_args(p, mutual=True)
    p.add_argument_group("TLS").add_argument(
        "--fleet-cert", default=None, help="certificate shown to the controller and workers (default: --tls-cert)")
    p.add_argument("--fleet-key", default=None, help="its key (default: --tls-key)")
    add_secret_args(p, ("admin",))
    p.add_argument("--controller", required=True, help="the controller's URL (http://host:21001)")
    p.add_argument("--retries", type=int, default=3,
                   help="workers tried for a request that fails before its first token (default 3)")
    p.add_argument("--no-web", action="store_true", help="do not serve the chat page at /")
    p.set_defaults(func=cmd_api)
