"""``quantchat bench serve --locust``: locust, headless, against a fleet on loopback (controller + N
workers + API), with one worker killed (SIGKILL) while it runs.

Reports locust's totals (requests, failures, p50 / p95 latency to the last token) and checks the failure
story: only requests in flight when the worker died may fail, every request started after the controller
dropped it succeeds, the controller drops it within its heartbeat expiry, and locust ends on time (nothing
hangs). The locust user is ``locustfile.py`` (run in locust's own process: gevent patches the standard
library). Writes result.json (``Results`` of kind bench-serve-locust), result.md and locust's CSV files.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantchat.benchmark.loadtest import wait_healthy
from quantchat.benchmark.results import Results, markdown_table, prepare_out_dir, write_results
from quantchat.benchmark.serving import (free_port, model_args, start, stop, wait_registered,
                                         worker_addresses)
from quantchat.errors import QuantchatError

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def locust_available() -> str | None:
    """None when locust runs here, else why not."""
    r = subprocess.run([sys.executable, "-m", "locust", "--version"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"locust is not installed ({r.stderr.strip()[-200:]}): pip install locust"


def read_stats(prefix: Path) -> dict[str, Any]:
    """The Aggregated row of locust's ``PREFIX_stats.csv``: requests, failures, latency percentiles (ms)."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    if not rows:
        raise QuantchatError(f"locust wrote no totals to {prefix}_stats.csv")
    r = rows[0]
    pick = (lambda k: float(r[k]) if r.get(k) not in (None, "", "N/A") else 0.0)
    return {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
            "latency_ms": {"p50": pick("50%"), "p95": pick("95%"), "max": pick("Max Response Time"),
                           "mean": pick("Average Response Time")},
            "requests_per_s": pick("Requests/s")}


def judge(events: list[dict], killed_at: float | None, dropped_at: float | None) -> dict[str, Any]:
    """Sort the requests by when they ran relative to the kill: failures while the dead worker was
    listed (in flight on it, or dispatched to it before it was dropped) are allowed, any other is not."""
    before = [e for e in events if killed_at is None or e["end"] < killed_at]
    during = [e for e in events if killed_at is not None and e["end"] >= killed_at
              and e["start"] < (dropped_at or float("inf"))]
    after = [e for e in events if dropped_at is not None and e["start"] >= dropped_at]
    return {"before_kill": {"requests": len(before), "failures": sum(not e["ok"] for e in before)},
            "in_flight_at_kill": {"requests": len([e for e in during if e["start"] < killed_at]),
                                  "failures": sum(not e["ok"] for e in during)},
            "after_drop": {"requests": len(after), "failures": sum(not e["ok"] for e in after)},
            "errors": sorted({e["error"].split(":")[0] for e in events if not e["ok"] and e["error"]})[:10]}


def run_locust(a: argparse.Namespace, status: Callable[[str], None]) -> int:
    """Start the fleet, run locust for ``a.duration`` s with ``a.users`` users, kill one worker at
    ``a.kill_worker_at`` s (0: none), report, check; 0 when every check passed."""
    why = locust_available()
    if why:
        raise QuantchatError(why)
    n_workers = max(a.workers) if a.workers else 2
    if a.users < 1 or a.duration < 5 or n_workers < 1:
        raise QuantchatError("--users must be positive, --duration at least 5 s, --workers at least 1")
    if a.kill_worker_at and (n_workers < 2 or not 0 < a.kill_worker_at < a.duration):
        raise QuantchatError("--kill-worker-at needs 2+ workers and a time inside --duration")
    out = prepare_out_dir(a.out, "bench-serve-locust")
    secret = "bench-" + os.urandom(12).hex()
    env = {**os.environ, "QUANTCHAT_SECRET": secret}
    threads = max(1, (a.threads or os.cpu_count() or 1) // n_workers)
    cport = free_port()
    procs = [start(["controller", "--port", str(cport), "--heartbeat-expiry", str(a.heartbeat_expiry)], env)]
    curl = f"http://127.0.0.1:{cport}"
    try:
        wait_healthy(curl, 60, procs[0])
        ports = [free_port() for _ in range(n_workers)]
        workers = [start(["worker", *model_args(a), "--controller", curl, "--port", str(p), "--threads",
                          str(threads), "--heartbeat-interval", str(a.heartbeat_interval)], env) for p in ports]
        procs += workers
        aport = free_port()
        procs.append(start(["api", "--controller", curl, "--port", str(aport), "--no-web"], env))
        url = f"http://127.0.0.1:{aport}"
        status(f"starting controller + {n_workers} worker(s) x {threads} thread(s) + API...")
        wait_registered(curl, secret, n_workers, procs)
        wait_healthy(url, 60, procs[-1])
        log = out / "requests.jsonl"
        prefix = out / "locust"
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
               "-u", str(a.users), "-r", str(a.users), "-t", f"{a.duration}s", "--stop-timeout", "30",
               "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
        lenv = {**os.environ, "QUANTCHAT_LOCUST_LOG": str(log), "QUANTCHAT_LOCUST_MAX_TOKENS": str(a.max_tokens)}
        status(f"locust: {a.users} users for {a.duration} s" +
               (f", worker :{ports[0]} killed at {a.kill_worker_at} s" if a.kill_worker_at else ""))
        killed: dict[str, float] = {}
        t0 = time.time()
        loc = subprocess.Popen(cmd, env=lenv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(loc.stdout), daemon=True)
        reader.start()
        if a.kill_worker_at:
            time.sleep(max(0.0, t0 + a.kill_worker_at - time.time()))
            victim = f"http://127.0.0.1:{ports[0]}"
            workers[0].send_signal(signal.SIGKILL)
            killed["at"] = time.time()
            while victim in worker_addresses(curl, secret):
                if time.time() - killed["at"] > a.heartbeat_expiry + 30:
                    break
                time.sleep(0.1)
            else:
                killed["dropped"] = time.time()
        limit = a.duration + 30 + 30  # run, stop timeout, slack: more means something hangs
        try:
            loc.wait(timeout=max(1.0, t0 + limit - time.time()))
            hung = False
        except subprocess.TimeoutExpired:
            loc.kill()
            loc.wait()
            hung = True
        reader.join(timeout=5)
        wall = time.time() - t0
        if loc.returncode not in (0, None) and not hung:
            raise QuantchatError(f"locust exited with code {loc.returncode}:\n{''.join(output)[-2000:]}")
        totals = read_stats(prefix)
        lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()] if log.is_file() else []
    finally:
        stop(procs)
    events = [e for e in lines if "end" in e]
    begun = {e["id"]: e["begin"] for e in lines if "begin" in e}
    interrupted = {e["id"]: e["interrupted"] - begun.get(e["id"], e["interrupted"]) for e in lines
                   if "interrupted" in e}  # stopped by locust at the end (its stop timeout), seconds in
    unfinished = len(set(begun) - {e["id"] for e in events} - set(interrupted))
    killed_at, dropped_at = killed.get("at"), killed.get("dropped")
    verdict = judge(events, killed_at, dropped_at)
    drop_s = None if killed_at is None or dropped_at is None else dropped_at - killed_at
    checks = {
        # locust ended on time, and every request that began ended (or was stopped by locust at the end),
        # well within its timeout
        "nothing hung": not hung and unfinished == 0 and bool(events)
                        and max([e["end"] - e["start"] for e in events] + list(interrupted.values())) < 60,
        "no failure before the kill": verdict["before_kill"]["failures"] == 0,
        "every request after the drop succeeded": verdict["after_drop"]["failures"] == 0,
    }
    if killed_at is not None:
        checks["dead worker dropped within the heartbeat expiry"] = drop_s is not None and drop_s <= a.heartbeat_expiry
        checks["requests ran after the drop"] = verdict["after_drop"]["requests"] > 0
    row = {"users": a.users, "duration_s": a.duration, "workers": n_workers, "wall_s": round(wall, 1), **totals,
           "logged": {"requests": len(events), "failures": sum(not e["ok"] for e in events),
                      "stopped_at_the_end": len(interrupted), "unfinished": unfinished},
           "killed_worker_at_s": a.kill_worker_at or None,
           "dropped_after_s": None if drop_s is None else round(drop_s, 2), **verdict, "checks": checks}
    table = markdown_table(
        ["users", "workers", "s", "requests", "failures", "req/s", "p50 ms", "p95 ms", "worker killed at s",
         "dropped after s", "failed in flight", "failed after drop"],
        [[a.users, n_workers, a.duration, totals["requests"], totals["failures"], f"{totals['requests_per_s']:.2f}",
          f"{totals['latency_ms']['p50']:.0f}", f"{totals['latency_ms']['p95']:.0f}", a.kill_worker_at or "-",
          "-" if drop_s is None else f"{drop_s:.2f}", verdict["in_flight_at_kill"]["failures"],
          verdict["after_drop"]["failures"]]])
    summary = "\n".join(f"- {'ok' if ok else 'FAILED'}: {name}" for name, ok in checks.items())
    print(table + "\n" + summary)
    results = Results("bench-serve-locust", fields={
        "options": {k: v for k, v in vars(a).items() if k not in ("func", "api_key")}, "rows": [row]})
    write_results(out, "quantchat bench serve --locust", results, table + "\n\n" + summary)
    status(f"results in {out}")
    return 0 if all(checks.values()) else 1
