"""locust against a fleet on loopback (controller + 2 workers with the default model + API), 16 users for
30 s (the bench's default is 60 s), one worker SIGKILLed 10 s in: only requests in flight on it may fail,
every request started after the controller dropped it succeeds, it is dropped within the heartbeat expiry,
nothing hangs. Runs ``quantchat bench serve --locust`` itself and prints its numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_locust_fleet_survives_a_killed_worker(tmp_path):
    from quantchat.benchmark.locust_load import locust_available

    why = locust_available()
    if why:
        pytest.skip(why)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "quantchat", "bench", "serve", "--locust", "--users", "16", "--duration", "30",
           "--kill-worker-at", "10", "--workers", "2", "--max-tokens", "16", "--max-seq-len", "512",
           "--heartbeat-interval", "2", "--heartbeat-expiry", "8", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=str(ROOT),
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(r.stdout)
    row = json.loads((out / "result.json").read_text())["rows"][0]
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert all(row["checks"].values()), row["checks"]
    logged = row["logged"]  # every request, from the locust user's own log (locust's CSV may miss the last)
    assert row["requests"] > 50 and logged["requests"] >= row["requests"] and logged["unfinished"] == 0
    assert logged["failures"] == row["in_flight_at_kill"]["failures"]  # none before the kill, none after the drop
    assert logged["failures"] <= row["in_flight_at_kill"]["requests"] + 16  # in flight, or sent before the drop
    assert row["after_drop"]["requests"] > 0 and row["after_drop"]["failures"] == 0
    assert row["dropped_after_s"] is not None and row["dropped_after_s"] <= 8
    assert row["latency_ms"]["p50"] > 0 and row["latency_ms"]["p95"] >= row["latency_ms"]["p50"]
    assert row["wall_s"] < 30 + 60
