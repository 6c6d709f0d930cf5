"""How long a user waits for the first answer: ``quantchat chat --prompt`` timed as whole processes, from
the start of the process to its first answer byte on stdout (time to first token, TTFT) and to its exit.

Three cases, each in a fresh ``QUANTCHAT_HOME`` (so nothing is cached before it):

- ``cold``: the first chat with nothing prepared: it converts the GGUF and builds the CPU kernels itself;
- ``after_prepare``: ``quantchat prepare`` (what the setup script runs) first, then the first chat;
- ``later``: further starts with everything cached (the median of ``--repeat`` runs).

    python -m quantchat.benchmark.startup [--model M] [--repeat 3] [--out quantchat-results/startup.json]

Prints a table and writes a ``startup`` results file (``benchmark.results``). Torch-free: every measured
step runs in its own process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from quantchat.benchmark.results import Results, prepare_out_dir

PROMPT = "What is the capital of France?"
TARGETS_S = {"after_prepare": 10.0, "later": 3.0}  # issue 21: first answer after setup, later starts (TTFT)


def quantchat_cmd() -> list[str]:
    return [sys.executable, "-m", "quantchat"]


def fresh_env(home: Path, share_kernels: bool = False) -> dict[str, str]:
    """The environment of a measured process: its own QUANTCHAT_HOME (and so its own kernel build, unless
    ``share_kernels`` keeps a QUANTCHAT_KERNELS_DIR set by the caller)."""
    env = {**os.environ, "QUANTCHAT_HOME": str(home), "QUANTCHAT_PROGRESS": "off"}
    if not share_kernels:
        env.pop("QUANTCHAT_KERNELS_DIR", None)
    return env


def time_chat(home: Path, model: str | None, max_new_tokens: int = 16, timeout: float = 300,
              share_kernels: bool = False) -> dict[str, Any]:
    """One ``quantchat chat --prompt`` process: seconds to its first stdout byte and to its exit."""
    cmd = [*quantchat_cmd(), "chat", "--prompt", PROMPT, "-n", str(max_new_tokens), "--seed", "0", "-t", "0"]
    if model:
        cmd += ["--model", model]
    env = fresh_env(home, share_kernels)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    ttft = time.perf_counter() - t0
    rest, err = proc.communicate(timeout=timeout)
    total = time.perf_counter() - t0
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    return {"ttft_s": round(ttft, 3), "total_s": round(total, 3),
            "answer": (first + rest).decode(errors="replace").strip()}


def time_prepare(home: Path, model: str | None, timeout: float = 600) -> float:
    cmd = [*quantchat_cmd(), "prepare"] + (["--model", model] if model else [])
    env = fresh_env(home)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"quantchat prepare failed: {res.stderr[-2000:]}")
    return round(time.perf_counter() - t0, 3)


def measure(model: str | None, repeat: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    base = Path(tempfile.mkdtemp(prefix="quantchat-startup-"))
    try:
        cold = time_chat(base / "cold", model)
        rows.append({"case": "cold", "prepare_s": None, **cold})
        prepared = base / "prepared"
        prep = time_prepare(prepared, model)
        first = time_chat(prepared, model)
        rows.append({"case": "after_prepare", "prepare_s": prep, **first})
        later = [time_chat(prepared, model) for _ in range(repeat)]
        rows.append({"case": "later", "prepare_s": None, "runs": later, "answer": later[0]["answer"],
                     "ttft_s": statistics.median(r["ttft_s"] for r in later),
                     "total_s": statistics.median(r["total_s"] for r in later)})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for r in rows:
        target = TARGETS_S.get(r["case"])
        r["target_ttft_s"] = target
        r["meets_target"] = None if target is None else r["ttft_s"] <= target
    return {"model": model or "default", "prompt": PROMPT, "rows": rows}


def table(fields: dict[str, Any]) -> str:
    lines = ["| case | prepare (s) | first token (s) | exit (s) | target (s) | answer |", "|---|---|---|---|---|---|"]
    for r in fields["rows"]:
        prep = "" if r["prepare_s"] is None else f"{r['prepare_s']:.1f}"
        target = "" if r["target_ttft_s"] is None else f"≤ {r['target_ttft_s']:.0f} ({'met' if r['meets_target'] else 'missed'})"
        answer = r["answer"].replace("|", "/").replace("\n", " ")[:40]
        lines.append(f"| {r['case']} | {prep} | {r['ttft_s']:.2f} | {r['total_s']:.2f} | {target} | {answer} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quantchat.benchmark.startup", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model to start (default: the embedded default model)")
    ap.add_argument("--repeat", type=int, default=3, help="later starts to time (median)")
    ap.add_argument("--out", default=None, help="results JSON (default: quantchat-results/startup-<time>/result.json)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    fields = measure(args.model, args.repeat)
    res = Results("startup", fields=fields)
    out = Path(args.out) if args.out else prepare_out_dir(None, "startup") / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res.write(out)
    print(f"CPU: {res.meta['cpu_model']} ({res.meta['nproc']} cores)")
    print(table(fields))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
