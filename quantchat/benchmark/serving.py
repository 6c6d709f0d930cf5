"""``quantchat bench serve``: total tokens/s, latency and TTFT percentiles under concurrent clients.

Either drives a running server (``--url``) or starts its own on loopback: ``quantchat serve`` (one worker)
for the clients sweep, then controller + 1 and + 2 workers + API (the seed's 1-pod vs 2-pod comparison)
at the largest client count. Writes result.json (``Results`` of kind bench-serve: options, rows), result.md
and throughput.png. The command line is defined in quantchat.cli.bench_cmds.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from quantchat.benchmark.loadtest import run_load, wait_healthy
from quantchat.benchmark.plots import plot_serving
from quantchat.benchmark.results import Results, markdown_table, prepare_out_dir, write_results
from quantchat.errors import QuantchatError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "quantchat", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def model_args(a: argparse.Namespace) -> list[str]:
    out = ["--quant", a.quant, "--max-batch", str(a.max_batch), "--max-seq-len", str(a.max_seq_len),
           "--kv-cache-dtype", a.kv_cache_dtype]
    if a.group_size:
        out += ["--group-size", str(a.group_size)]
    return (["--model", a.model] if a.model else []) + out


def engine_time(url: str, api_key: str | None) -> dict[str, Any] | None:
    """The worker's loop time from ``/metrics``: decode steps and seconds by batch size, prefill seconds
    (None when the server does not report them, e.g. behind a controller)."""
    try:
        r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    steps: dict[int, list[float]] = {}
    prefill = None
    for line in r.text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith(("quantchat_decode_steps_total{batch=", "quantchat_decode_seconds_total{batch=")):
            b = int(name.split('"')[1])
            steps.setdefault(b, [0.0, 0.0])[0 if "steps" in name else 1] = float(value)
        elif name == "quantchat_prefill_seconds_total":
            prefill = float(value)
    return None if prefill is None else {"steps": steps, "prefill_s": prefill}


def time_split(before: dict[str, Any] | None, after: dict[str, Any] | None, wall: float) -> dict[str, Any]:
    """What the worker did during one load run: mean decode step ms by batch size, prefill share of the wall."""
    if before is None or after is None or wall <= 0:
        return {}
    step_ms = {}
    for b, (n, s) in after["steps"].items():
        n0, s0 = before["steps"].get(b, [0.0, 0.0])
        if n - n0 > 0:
            step_ms[b] = {"steps": int(n - n0), "ms": 1000 * (s - s0) / (n - n0)}
    return {"decode_step_ms": step_ms, "prefill_share": (after["prefill_s"] - before["prefill_s"]) / wall}


def batching_gain(rows: list[dict[str, Any]], low: int, high: int) -> str:
    """The model-step side of scaling: how many times more tokens per second of decode step a batch of
    ``high`` sequences yields than one of ``low`` (from the server's own step timers), and the prefill share."""
    def step(clients: int) -> tuple[float, float] | None:
        row = next((r for r in rows if r["clients"] == clients and r.get("decode_step_ms")), None)
        if row is None:
            return None
        ms = row["decode_step_ms"].get(clients)
        return (ms["ms"], row["prefill_share"]) if ms else None

    lo, hi = step(low), step(high)
    if lo is None or hi is None:
        return ""
    return (f"decode steps: {low} sequence(s) {lo[0]:.1f} ms, {high} sequences {hi[0]:.1f} ms: "
            f"{high * lo[0] / (low * hi[0]):.2f}x the tokens per second of stepping; prefill took "
            f"{100 * lo[1]:.0f}% of the wall time with {low} client(s), {100 * hi[1]:.0f}% with {high}\n")


def sweep(url: str, a: argparse.Namespace, setup: str, clients: list[int], progress) -> list[dict[str, Any]]:
    """Run the client counts ``a.rounds`` times, interleaved (this host's speed drifts over minutes, so each
    round measures every client count side by side); one row per client count: the round with the median
    total tokens/s, with every round's value in ``tokens_per_s_rounds``."""
    rounds = a.rounds
    runs: dict[int, list[dict[str, Any]]] = {c: [] for c in clients}
    run_load(url, 1, 1, 4, api_key=a.api_key)  # warm-up
    for i in range(rounds):
        for c in clients:
            before = engine_time(url, a.api_key)
            r = run_load(url, c, a.requests, a.max_tokens, api_key=a.api_key)
            split = time_split(before, engine_time(url, a.api_key), r.wall_s)
            runs[c].append({"setup": setup, **r.as_dict(), **split})
            tag = f" (round {i + 1}/{rounds})" if rounds > 1 else ""
            progress(f"{setup}, {c} clients{tag}: {r.tokens_per_s:.1f} tok/s total, {r.errors} errors")
    rows = []
    for c in clients:
        ordered = sorted(runs[c], key=lambda r: r["tokens_per_s"])
        row = dict(ordered[(len(ordered) - 1) // 2])
        row["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in runs[c]]
        row["errors"] = sum(r["errors"] for r in runs[c])
        rows.append(row)
    return rows


def scaling(rows: list[dict[str, Any]], low: int, high: int) -> tuple[float, list[float]] | None:
    """Total tokens/s at ``high`` clients over ``low`` clients: the median of the per-round ratios, and them."""
    lo = next((r for r in rows if r["clients"] == low), None)
    hi = next((r for r in rows if r["clients"] == high), None)
    if lo is None or hi is None:
        return None
    ratios = [h / l for l, h in zip(lo["tokens_per_s_rounds"], hi["tokens_per_s_rounds"]) if l > 0]
    return (statistics.median(ratios), ratios) if ratios else None


def worker_addresses(controller_url: str, secret: str) -> list[str]:
    """The addresses the controller lists now (``GET /workers``)."""
    r = httpx.get(controller_url + "/workers", headers={"Authorization": f"Bearer {secret}"}, timeout=5)
    return [w["address"] for w in r.json()["workers"]]


def wait_registered(controller_url: str, secret: str, n_workers: int, procs: list[subprocess.Popen],
                    timeout: float = 600.0) -> None:
    """Until the controller lists ``n_workers`` workers (QuantchatError when a process exits or time is up)."""
    deadline = time.time() + timeout
    while len(worker_addresses(controller_url, secret)) < n_workers:
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            raise QuantchatError(f"the {n_workers} worker(s) did not all register")
        time.sleep(0.5)


def cluster_rows(a: argparse.Namespace, n_workers: int, clients: int, progress) -> list[dict[str, Any]]:
    secret = "bench-" + os.urandom(12).hex()
    env = {**os.environ, "QUANTCHAT_SECRET": secret}
    threads = max(1, (a.threads or os.cpu_count() or 1) // n_workers)
    cport = free_port()
    procs = [start(["controller", "--port", str(cport)], env)]
    try:
        curl = f"http://127.0.0.1:{cport}"
        wait_healthy(curl, 60, procs[0])
        for _ in range(n_workers):
            procs.append(start(["worker", *model_args(a), "--controller", curl, "--port", str(free_port()),
                                "--threads", str(threads)], env))
        aport = free_port()
        procs.append(start(["api", "--controller", curl, "--port", str(aport), "--no-web"], env))
        url = f"http://127.0.0.1:{aport}"
        wait_registered(curl, secret, n_workers, procs)
        wait_healthy(url, 60, procs[-1])
        saved, a.api_key = a.api_key, None
        try:
            return sweep(url, a, f"controller + {n_workers} worker(s) x {threads} thread(s)", [clients], progress)
        finally:
            a.api_key = saved
    finally:
        stop(procs)


def run_bench_serve(a: argparse.Namespace, status: Callable[[str], None]) -> int:
    """``quantchat bench serve`` with its parsed options ``a``; progress lines go to ``status``."""
    clients = a.clients
    if not clients or min(clients) < 1 or a.requests < 1 or a.max_tokens < 1 or a.rounds < 1:
        raise QuantchatError("--clients, --requests, --max-tokens and --rounds must be positive")
    out = prepare_out_dir(a.out, "bench-serve")
    rows: list[dict[str, Any]] = []
    if a.url:
        rows += sweep(a.url.rstrip("/"), a, f"server at {a.url}", clients, status)
    else:
        env = dict(os.environ)
        port = free_port()
        extra = ["--threads", str(a.threads)] if a.threads else []
        proc = start(["serve", *model_args(a), "--port", str(port), "--no-web", *extra], env)
        try:
            url = f"http://127.0.0.1:{port}"
            status("starting quantchat serve...")
            wait_healthy(url, 600, proc)
            rows += sweep(url, a, "serve (1 worker)", clients, status)
        finally:
            stop([proc])
        for n in a.workers:
            rows += cluster_rows(a, n, max(clients), status)
    table = markdown_table(
        ["setup", "clients", "requests", "errors", "total tok/s", "each round", "per-request tok/s",
         "latency p50 s", "latency p90 s", "TTFT p50 s", "TTFT p90 s"],
        [[r["setup"], r["clients"], r["requests"], r["errors"], f"{r['tokens_per_s']:.1f}",
          " / ".join(f"{x:.0f}" for x in r["tokens_per_s_rounds"]),
          f"{r['per_request_tokens_per_s']:.1f}", f"{r['latency_s'].get('p50', 0):.2f}",
          f"{r['latency_s'].get('p90', 0):.2f}", f"{r['ttft_s'].get('p50', 0):.2f}",
          f"{r['ttft_s'].get('p90', 0):.2f}"] for r in rows])
    first = [r for r in rows if r["setup"] == rows[0]["setup"]] if rows else []
    ratio = scaling(first, min(clients), max(clients)) if len(clients) > 1 else None
    summary = ""
    if ratio is not None:
        each = ", ".join(f"{x:.2f}x" for x in ratio[1])
        summary = (f"\n{max(clients)} clients / {min(clients)} client total tokens/s: {ratio[0]:.2f}x"
                   + (f" (median of rounds: {each})" if len(ratio[1]) > 1 else "") + "\n"
                   + batching_gain(first, min(clients), max(clients)))
    print(table + summary)
    results = Results("bench-serve", fields={"options": {k: v for k, v in vars(a).items() if k != "func"
                                                         and k != "api_key"}, "rows": rows})
    write_results(out, "quantchat bench serve", results, table + summary)
    plot_serving(results, out / "throughput.png")
    status(f"results in {out}")
    return 0 if rows and not any(r["errors"] for r in rows) else 1
