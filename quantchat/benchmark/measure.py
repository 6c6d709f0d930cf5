"""Measuring tools shared by ``quantchat bench`` and the scripts in ``bench/``.

Nothing here needs torch at import time: the process readings (/proc), CPU identification, the
machine-load probe, summary statistics and the fixed benchmark prompts are plain Python, so a
benchmark driver can use them without paying torch's import. ``weight_bytes`` / ``kv_cache_bytes``
take a loaded model, and the ``time_*`` helpers take an engine (or any callable step).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence

from quantchat.kernels import cpu_features

FIRST_ID = 100  # benchmark prompts avoid the lowest ids (special tokens in common vocabularies)
PROMPT_SEED = 1234
MB = 1e6


# ---------------------------------------------------------------------------------------------
# this process and the machine
# ---------------------------------------------------------------------------------------------
def proc_status_mb() -> dict[str, float]:
    """VmRSS / VmHWM (peak RSS) / RssAnon / RssFile of this process in MB (1e6 bytes); {} off Linux."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024 / MB
    except OSError:
        # no /proc: the peak is all we can get (ru_maxrss is in KiB on Linux, bytes on macOS)

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak / MB if platform.system() == "Darwin" else peak * 1024 / MB
        out = {"VmRSS": peak, "VmHWM": peak}
    return out


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_busy_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies of the whole machine since boot, from /proc/stat ((0, 0) off Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    user, nice, system, idle, iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return user + nice + system + irq + softirq, steal


class ChildUsage:
    """CPU accounting around running a child process (``with ChildUsage() as u: subprocess.run(...)``):
    ``wall``, ``child_cpu`` (the children's user + system seconds), ``foreign_busy_cores`` (other processes'
    CPU use during the run, in cores) and ``steal_cores`` (the hypervisor's)."""

    def __enter__(self) -> ChildUsage:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.b0, self.s0 = cpu_busy_jiffies()
        self.ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        b1, s1 = cpu_busy_jiffies()
        self.child_cpu = (ru1.ru_utime - self.ru0.ru_utime) + (ru1.ru_stime - self.ru0.ru_stime)
        wall = max(self.wall, 1e-6)
        self.foreign_busy_cores = max(0.0, (b1 - self.b0) / self.hz - self.child_cpu) / wall
        self.steal_cores = (s1 - self.s0) / self.hz / wall


def busy_cores(window_s: float) -> float:
    """Cores busy (all processes) over the next ``window_s`` seconds."""
    hz = os.sysconf("SC_CLK_TCK")
    b0, _ = cpu_busy_jiffies()
    time.sleep(window_s)
    b1, _ = cpu_busy_jiffies()
    return (b1 - b0) / hz / window_s


class ForeignLoad:
    """Other processes' CPU use (in cores) while a block ran: ``with ForeignLoad() as fl: ...; fl.cores``."""

    def __enter__(self) -> "ForeignLoad":
        self.hz = os.sysconf("SC_CLK_TCK")
        t = os.times()
        self.b0, self.c0, self.w0 = cpu_busy_jiffies()[0], t.user + t.system, time.perf_counter()
        self.cores = 0.0
        return self

    def __exit__(self, *exc) -> None:
        t = os.times()
        b1, c1, w1 = cpu_busy_jiffies()[0], t.user + t.system, time.perf_counter()
        self.cores = max(0.0, (b1 - self.b0) / self.hz - (c1 - self.c0)) / max(w1 - self.w0, 1e-6)


def cpu_model_name() -> str:
    return cpu_features.cpu_model()


def cpu_flags() -> list[str]:
    """The matrix-relevant CPU flags present (bf16 is only fast with avx512_bf16 or amx_bf16)."""
    want = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    have = cpu_features.cpu_flags() or frozenset()
    return [f for f in want if f in have]


def machine_info() -> dict:
    """CPU, core count, memory, Python; torch and GPU when torch is already imported."""
    import sys

    info = {"cpu_model": cpu_model_name(), "cpu_flags": cpu_flags(), "nproc": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "mem_available_gb": (mem_available_bytes() or 0) / 1e9, "load_avg": list(os.getloadavg())}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------
# statistics and prompts
# ---------------------------------------------------------------------------------------------
def stats(values: Sequence[float]) -> dict:
    """median / min / max and the raw values (core_bench's format)."""
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict:
    """Per-step latencies (s) -> median / mean / p10 / p90 / min / max in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    return {"median": statistics.median(ms), "mean": statistics.fmean(ms), "p10": percentile(ms, 10),
            "p90": percentile(ms, 90), "min": ms[0], "max": ms[-1], "n": len(ms)}


def fmt_stat(s: dict | None, digits: int = 1) -> str:
    if not s:
        return "–"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def prompt_ids(vocab_size: int, n: int, seed: int = PROMPT_SEED, first_id: int = FIRST_ID) -> list[int]:
    """Deterministic pseudo-random token ids in [first_id, vocab_size) (a plain LCG: no torch/numpy needed).

    The same (vocab_size, n, seed) gives the same ids in every engine, so no tokenizer is involved.
    """
    first = first_id if vocab_size > 2 * first_id else min(3, vocab_size - 1)
    state, ids = seed, []
    for _ in range(n):
        state = (6364136223846793005 * state + 1442695040888963407) % (1 << 64)
        ids.append(first + (state >> 33) % (vocab_size - first))
    return ids


class ContentionGuard:
    """Runs a timed function, measuring other processes' CPU use meanwhile; redoes disturbed runs."""

    def __init__(self, max_busy: float, max_wait: float, retries: int) -> None:
        self.max_busy, self.max_wait, self.retries = max_busy, max_wait, retries
        self.hz = os.sysconf("SC_CLK_TCK")
        self.waited = 0.0

    def _own_cpu(self) -> float:
        t = os.times()
        return t.user + t.system

    def foreign_during(self, fn):
        b0, c0, w0 = cpu_busy_jiffies()[0], self._own_cpu(), time.perf_counter()
        out = fn()
        b1, c1, w1 = cpu_busy_jiffies()[0], self._own_cpu(), time.perf_counter()
        return out, max(0.0, (b1 - b0) / self.hz - (c1 - c0)) / max(w1 - w0, 1e-6)

    def wait_quiet(self) -> None:
        while self.waited < self.max_wait:
            t = time.perf_counter()
            busy = busy_cores(2.0)
            self.waited += time.perf_counter() - t
            if busy <= self.max_busy:
                return

    def run(self, fn):
        """(fn's result, foreign busy cores during it, number of discarded attempts)."""
        bad = 0
        while True:
            out, load = self.foreign_during(fn)
            if load <= self.max_busy or bad >= self.retries or self.waited >= self.max_wait:
                return out, load, bad
            bad += 1
            self.wait_quiet()


# ---------------------------------------------------------------------------------------------
# model-side measurements (torch imported lazily)
# ---------------------------------------------------------------------------------------------
def weight_bytes(model) -> int:
    """Bytes of the model's weights as resident (packed codes for quantized modules; KV cache excluded).

    Shared storage (tied embedding / int8 head rows) is counted once.
    """
    import torch

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for m in model.modules():  # int8 embedding shares the head's buffers; count non-buffer tensors once
        for name in ("weight_int8", "scales"):
            t = m.__dict__.get(name)
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total - kv_cache_bytes(model)


def kv_cache_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "cache" in n)


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def time_decode_steps(step: Callable[[int, int], int], first_token: int, start_pos: int, warmup: int,
                      steps: int, device="cpu") -> tuple[list[float], list[int]]:
    """TinyChat's decode measurement: run ``warmup`` + ``steps`` greedy decode steps one token at a time and
    time each timed step on its own (perf_counter around the step, the device synchronized).

    ``step(token, pos)`` runs one decode step for ``token`` at position ``pos`` and returns the next
    (greedy) token. Returns (seconds per timed step, generated tokens).
    """
    tok, pos, lat, toks = first_token, start_pos, [], []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        tok = step(tok, pos)
        _sync(device)
        dt = time.perf_counter() - t0
        if i >= warmup:
            lat.append(dt)
        toks.append(tok)
        pos += 1
    return lat, toks


def engine_step_fns(engine):
    """(prefill(tokens) -> first greedy token, decode_step(token, pos) -> next greedy token) for a quantchat Engine."""
    import torch

    dev = engine.device

    def prefill(tokens: list[int]) -> int:
        return int(torch.argmax(engine.prefill(list(tokens), slot=0, start_pos=0)))

    def step(tok: int, pos: int) -> int:
        logits = engine.decode(torch.tensor([tok], device=dev), torch.tensor([pos], device=dev), slot=0)
        return int(torch.argmax(logits[0]))

    return prefill, step


def time_first_token(prefill: Callable[[list[int]], int], prompt: list[int], runs: int,
                     device="cpu") -> list[float]:
    """Seconds from a prompt (into an empty cache) to its first greedy token, ``runs`` times."""
    out = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        prefill(prompt)
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def ttft_entry(prompt_len: int, seconds: Sequence[float]) -> dict:
    """One time-to-first-token result: median / min / max ms over the runs, and the prefill rate."""
    ms = [t * 1000 for t in seconds]
    med = statistics.median(ms)
    return {"prompt_len": prompt_len, "ms": {"median": med, "min": min(ms), "max": max(ms), "runs": ms},
            "prefill_tok_s": prompt_len / (med / 1000) if med > 0 else None}


def measure_speed(prefill: Callable[[list[int]], int], step: Callable[[int, int], int], vocab_size: int,
                  max_prompt: int, job: dict, device="cpu", log: Callable[[str], None] = lambda m: None) -> dict:
    """The speed part of a benchmark job, the same for every engine: greedy decode latency after a
    ``decode_context``-token prompt, resident memory, then time to first token for each of
    ``prompt_lengths`` (those >= ``max_prompt`` are skipped with a note); other processes' CPU use
    meanwhile. Returns the result fields (decode, rss_*, ttft, peak_rss_mb, ...)."""
    res: dict = {}
    seed = int(job.get("seed", 1234))
    ctx_prompt = prompt_ids(vocab_size, int(job["decode_context"]), seed)
    log(f"decode: {job['warmup_steps']} warm-up + {job['steps']} timed steps after a {len(ctx_prompt)}-token prompt")
    with ForeignLoad() as fl:
        first = prefill(ctx_prompt)
        lat, toks = time_decode_steps(step, first, len(ctx_prompt), int(job["warmup_steps"]), int(job["steps"]),
                                      device)
    s = latency_summary(lat)
    res["decode"] = {"latency_ms": s, "tokens_per_s": 1000.0 / s["median"], "steps": len(lat),
                     "warmup_steps": int(job["warmup_steps"]), "context_tokens": len(ctx_prompt),
                     "latencies_ms": [x * 1000 for x in lat], "foreign_busy_cores": fl.cores, "tokens": toks}
    m = proc_status_mb()
    res["rss_mb"] = m.get("VmRSS")  # steady state: weights, KV cache, decode buffers
    res["rss_anon_mb"] = m.get("RssAnon")
    res["rss_file_mb"] = m.get("RssFile")
    res["ttft"] = []
    lengths = list(job["prompt_lengths"])
    with ForeignLoad() as fl:
        if lengths:
            prefill(prompt_ids(vocab_size, min(lengths), seed + 1))  # warm-up
        for L in lengths:
            if L >= max_prompt:
                res["ttft"].append({"prompt_len": L, "skipped": f"prompt length {L} >= context {max_prompt}"})
                continue
            log(f"time to first token: {L}-token prompt x {job['ttft_runs']}")
            times = time_first_token(prefill, prompt_ids(vocab_size, L, seed + L), int(job["ttft_runs"]), device)
            res["ttft"].append(ttft_entry(L, times))
    res["ttft_foreign_busy_cores"] = fl.cores
    end = proc_status_mb()
    res["rss_end_mb"] = end.get("VmRSS")
    res["peak_rss_mb"] = end.get("VmHWM")
    return res
