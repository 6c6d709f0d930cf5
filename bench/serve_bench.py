"""Serving load benchmark: total tokens/s with 1, 4 and 8 concurrent clients against one worker
(``quantchat serve``), and, when the cluster commands exist, 1 vs 2 workers behind the controller.

    .venv/bin/python bench/serve_bench.py [--model M] [--quant int4-asym] [--max-tokens 64] [--requests 2]

Prints a markdown table and writes bench/results/serve_bench.json. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from quantchat.serving.loadtest import run_load, wait_healthy

ROOT = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "quantchat", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ})


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def model_args(a: argparse.Namespace) -> list[str]:
    out = ["--quant", a.quant, "--group-size", str(a.group_size), "--max-batch", "8", "--max-seq-len", "1024"]
    return (["--model", a.model] if a.model else []) + out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--quant", default="int4-asym")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-cluster", action="store_true")
    a = ap.parse_args()
    clients = [int(c) for c in a.clients.split(",")]
    rows = []

    port = free_port()
    proc = start(["serve", *model_args(a), "--port", str(port), "--threads", str(a.threads), "--no-web"])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc=proc)
        run_load(url, 1, 1, 8)  # warm-up
        for c in clients:
            r = run_load(url, c, a.requests, a.max_tokens)
            rows.append({"setup": "serve (1 worker)", **r.as_dict()})
            print(f"1 worker, {c} clients: {r.tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        stop([proc])

    from quantchat.cli import main as cli_main

    if not a.skip_cluster and "quantchat.cli.cluster_cmds" in cli_main.COMMAND_MODULES:
        secret = "bench-secret"
        env_secret = ["--secret", secret]
        for n_workers in (1, 2):
            cport = free_port()
            procs = [start(["controller", "--port", str(cport), *env_secret])]
            try:
                curl = f"http://127.0.0.1:{cport}"
                time.sleep(2)
                threads = max(1, a.threads // n_workers)
                for _ in range(n_workers):
                    procs.append(start(["worker", *model_args(a), "--controller", curl, "--port", str(free_port()),
                                        "--threads", str(threads), *env_secret]))
                aport = free_port()
                procs.append(start(["api", "--controller", curl, "--port", str(aport), *env_secret]))
                url = f"http://127.0.0.1:{aport}"
                wait_healthy(url, proc=procs[-1])
                deadline = time.time() + 300
                while time.time() < deadline:  # wait until every worker registered
                    import httpx

                    ws = httpx.get(curl + "/workers", headers={"Authorization": f"Bearer {secret}"}, timeout=5).json()
                    if len(ws.get("workers", ws)) >= n_workers:
                        break
                    time.sleep(0.5)
                run_load(url, 2, 1, 8)
                c = max(clients)
                r = run_load(url, c, a.requests, a.max_tokens)
                rows.append({"setup": f"controller + {n_workers} worker(s), {threads} thread(s) each", **r.as_dict()})
                print(f"{n_workers} workers, {c} clients: {r.tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True)
            finally:
                stop(procs)

    print("| setup | clients | requests | errors | total tok/s | per-request tok/s | latency p50 s | TTFT p50 s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['tokens_per_s']:.1f} | "
              f"{r['per_request_tokens_per_s']:.1f} | {r['latency_s'].get('p50', 0):.2f} | "
              f"{r['ttft_s'].get('p50', 0):.2f} |")
    base = next((r for r in rows if r["setup"].startswith("serve") and r["clients"] == 1), None)
    top = next((r for r in rows if r["setup"].startswith("serve") and r["clients"] == 8), None)
    if base and top and base["tokens_per_s"]:
        print(f"\n8 clients / 1 client total tok/s: {top['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / "serve_bench.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
