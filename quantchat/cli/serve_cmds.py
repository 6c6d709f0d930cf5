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


def read_api_keys(args: argparse.Namespace) -> set[str]:
    """Keys from --api-key (repeatable), --api-key-file (one per line) and $QUANTCHAT_API_KEY."""
    keys = {k.strip() for k in (args.api_key or []) if k.strip()}
    if args.api_key_file:
        try:
            text = Path(args.api_key_file).read_text(encoding="utf-8")
        except OSError as e:
            raise QuantchatError(f"{args.api_key_file}: cannot read API keys ({e.strerror})") from None
        keys |= {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
        if not keys:
            raise QuantchatError(f"{args.api_key_file}: no API key in the file")
    env = os.environ.get("QUANTCHAT_API_KEY", "").strip()
    if env:
        keys.add(env)
    return keys


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
    g.add_argument("--api-key-file", default=None, help="file with API keys, one per line")
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


def run_uvicorn(app, host: str, port: int, log_level: str) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3)


def cmd_serve(args: argparse.Namespace) -> int:
    from quantchat.serving.backend import LocalBackend
    from quantchat.serving.openai.app import create_app

    keys = read_api_keys(args)
    check_worker_args(args)
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
    status(f"quantchat serving on http://{args.host}:{args.port}/ (OpenAI API at /v1, chat page at /)"
           + (" — API key required" if keys else ""))
    try:
        run_uvicorn(app, args.host, args.port, args.log_level)
    finally:
        if backend.worker is not None:
            backend.worker.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API + web chat page + one worker, in one process")
    add_model_args(p, max_seq_len=2048)
    add_server_args(p, port=8000)
    add_worker_args(p)
    p.add_argument("--no-web", action="store_true", help="do not serve the chat page at /")
    p.set_defaults(func=cmd_serve, quant=None)
