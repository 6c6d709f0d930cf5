#!/usr/bin/env python
"""Side-by-side core benchmark: quantchat vs transformers, float32 and bfloat16, on CPU.

For each engine and dtype (each in its own subprocess, run one after another) it measures:

* load time and resident memory (RSS) after load, and the process's peak RSS at the end;
* decode tokens/s: ``--new-tokens`` (128) new tokens, greedy, EOS ignored, after a short fixed prompt
  (16 tokens); the clock runs from the 1st to the last generated token, so the rate is
  (new_tokens - 1) / time and prefill / first-token time is excluded. One warm-up run, then the
  median (and min/max) of ``--runs``.
  - quantchat "generate": the real user path, ``Engine.generate(prompt, SamplingParams(temperature=0,
    ignore_eos=True))``, timed between the first and the last yielded token (includes sampling and
    streaming detokenization);
  - quantchat "raw loop": ``Engine.decode`` + argmax in a Python loop (the model step alone);
  - transformers "generate": ``model.generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)``
    (eager attention, default DynamicCache) timed with a streamer between the first and last token;
  - transformers "raw loop": forward + argmax in a Python loop over a ``DynamicCache``.
* prefill tokens/s: one ``--prompt-len`` (512) token prompt into an empty cache; median of ``--runs``
  after a warm-up. quantchat: ``Engine.prefill`` (logits of the last position only). transformers:
  ``model(ids, past_key_values=DynamicCache(), logits_to_keep=1)`` (the same work: KV cache filled,
  last logits only); a plain ``model(ids)`` (logits for all 512 positions) is reported as well.

The prompts are fixed token ids drawn from a seeded generator over the vocabulary (no special
tokens), identical for every engine, so the benchmark does not depend on any tokenizer.

Both engines load the same folder: the float32 Hugging Face folder quantchat converts the GGUF into.
RSS is reported after load and after the first decode (transformers memory-maps the safetensors and
only touches weights on first use), with the file-backed part (mapped weights) shown separately.

The machine is shared: before each worker the driver waits (up to ``--max-wait`` s) for other processes
to use at most ``--max-busy`` cores (and, at the start, for a 1-min load average below ``--max-load``);
inside the worker every timed run is redone (up to ``--retries`` times) if other processes used more
than ``--max-busy`` cores while it ran. The table shows the worst kept run's foreign load.
``--profile`` adds torch.profiler tables (top ops by self CPU time over 20 raw decode steps).

Usage: python -m quantchat.benchmark.core_bench [--threads 2] [--runs 3] [--new-tokens 128] [--prompt-len 512]
       [--dtypes float32,bfloat16] [--engines quantchat,transformers] [--model PATH]
       [--out quantchat-results/core.json] [--max-wait 900] [--max-busy 0.3] [--retries 5] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the measuring tools live in quantchat.benchmark.measure (shared with `quantchat bench`); no torch needed
from quantchat.benchmark.measure import (
    PROMPT_SEED,
    ChildUsage,
    ContentionGuard,
    busy_cores,
    cpu_flags,
    cpu_model_name,
    fmt_stat,
    proc_status_mb,
    prompt_ids,
    stats,
)
from quantchat.benchmark.results import PACKAGE_ROOT, RESULTS_DIR, Results, run_meta
from quantchat.benchmark.runner import worker_env

RESULT_MARK = "@@CORE_BENCH_RESULT@@ "
DECODE_PROMPT_LEN = 16


# ---------------------------------------------------------------------------------------------
# worker: one engine, one dtype, in its own process
# ---------------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.spec).read_text())
    hf_dir = Path(spec["hf_dir"])
    decode_prompt, prefill_prompt = spec["decode_prompt"], spec["prefill_prompt"]
    n_new, runs = args.new_tokens, args.runs
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    res: dict = {"engine": args.engine, "dtype": args.dtype, "threads": torch.get_num_threads(),
                 "torch": torch.__version__}

    if args.engine == "quantchat":
        from quantchat.engine.build import load_engine
        from quantchat.sampling.sampling import SamplingParams

        mem0 = proc_status_mb()
        t0 = time.perf_counter()
        loaded = load_engine(str(hf_dir), device="cpu", dtype=args.dtype,
                             max_seq_len=max(1024, len(prefill_prompt) + 1, len(decode_prompt) + n_new + 1))
        res["load_s"] = time.perf_counter() - t0
        res["load_s_reported"] = loaded.load_s
        mem1 = proc_status_mb()
        engine = loaded.engine
        try:
            engine.tokenizer.encode("Hello, world!")
            res["tokenizer_ok"] = True
        except Exception as e:  # the benchmark does not need it; report only
            res["tokenizer_ok"] = f"{type(e).__name__}: {e}"

        def run_generate() -> tuple[float, list[int]]:
            params = SamplingParams(temperature=0.0, max_new_tokens=n_new, ignore_eos=True)
            times, toks = [], []
            for chunk in engine.generate(list(decode_prompt), params):
                if chunk.token is not None:
                    times.append(time.perf_counter())
                    toks.append(chunk.token)
            assert len(toks) == n_new, f"generate gave {len(toks)} tokens, wanted {n_new}"
            return (n_new - 1) / (times[-1] - times[0]), toks

        @torch.inference_mode()
        def run_raw() -> tuple[float, list[int]]:
            logits = engine.prefill(list(decode_prompt), slot=0, start_pos=0)
            tok = int(torch.argmax(logits))
            t_first = time.perf_counter()
            toks, pos = [tok], len(decode_prompt)
            for _ in range(n_new - 1):
                logits = engine.decode(torch.tensor([tok]), torch.tensor([pos]))
                tok = int(torch.argmax(logits[0]))
                toks.append(tok)
                pos += 1
            return (n_new - 1) / (time.perf_counter() - t_first), toks

        @torch.inference_mode()
        def run_prefill() -> float:
            t = time.perf_counter()
            engine.prefill(list(prefill_prompt), slot=0, start_pos=0)
            return len(prefill_prompt) / (time.perf_counter() - t)

        methods = {"decode_generate": run_generate, "decode_raw": run_raw}
        prefills = {"prefill": run_prefill}

    elif args.engine == "transformers":
        import transformers
        from transformers import DynamicCache, LlamaForCausalLM
        from transformers.generation.streamers import BaseStreamer

        transformers.logging.set_verbosity_error()
        res["transformers"] = transformers.__version__
        mem0 = proc_status_mb()
        t0 = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager").eval()
        res["load_s"] = time.perf_counter() - t0
        mem1 = proc_status_mb()
        res["attn_implementation"] = model.config._attn_implementation

        class Stamps(BaseStreamer):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.calls = 0

            def put(self, value) -> None:
                self.calls += 1
                if self.calls > 1:  # the first call carries the prompt
                    self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        dec_ids = torch.tensor([decode_prompt])
        pre_ids = torch.tensor([prefill_prompt])

        @torch.inference_mode()
        def run_generate() -> tuple[float, list[int]]:
            st = Stamps()
            out = model.generate(dec_ids, attention_mask=torch.ones_like(dec_ids), do_sample=False,
                                 min_new_tokens=n_new, max_new_tokens=n_new, streamer=st,
                                 temperature=None, top_p=None, top_k=None)
            toks = out[0, dec_ids.shape[1]:].tolist()
            assert len(toks) == n_new and len(st.times) == n_new, (len(toks), len(st.times))
            return (n_new - 1) / (st.times[-1] - st.times[0]), toks

        @torch.inference_mode()
        def run_raw() -> tuple[float, list[int]]:
            cache = DynamicCache(config=model.config)
            logits = model(dec_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            tok = int(torch.argmax(logits[0, -1]))
            t_first = time.perf_counter()
            toks = [tok]
            for _ in range(n_new - 1):
                logits = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits
                tok = int(torch.argmax(logits[0, -1]))
                toks.append(tok)
            return (n_new - 1) / (time.perf_counter() - t_first), toks

        @torch.inference_mode()
        def run_prefill() -> float:
            t = time.perf_counter()
            model(pre_ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
            return pre_ids.shape[1] / (time.perf_counter() - t)

        @torch.inference_mode()
        def run_prefill_full() -> float:
            t = time.perf_counter()
            model(pre_ids)
            return pre_ids.shape[1] / (time.perf_counter() - t)

        methods = {"decode_generate": run_generate, "decode_raw": run_raw}
        prefills = {"prefill": run_prefill, "prefill_all_logits": run_prefill_full}
    else:
        raise SystemExit(f"unknown engine {args.engine}")

    res["rss_before_load_mb"] = mem0["VmRSS"]
    res["rss_after_load_mb"] = mem1["VmRSS"]
    res["rss_anon_after_load_mb"] = mem1.get("RssAnon")
    res["rss_file_after_load_mb"] = mem1.get("RssFile")
    res["rss_load_delta_mb"] = mem1["VmRSS"] - mem0["VmRSS"]

    # Decode: warm-up, then `runs` timed runs, each method in turn; then prefill the same way.
    # Every timed run is checked for CPU use by other processes and redone (up to --retries times)
    # when it was disturbed: with as many torch threads as cores, a little foreign load slows
    # small kernels down many times over (a thread waits at every barrier for a descheduled peer).
    guard = ContentionGuard(args.max_busy, args.max_wait, args.retries)
    for name, fn in {**methods, **prefills}.items():
        try:
            fn()  # warm-up
            if "rss_after_warmup_mb" not in res:  # weights touched once (mmap-backed ones count only now)
                m = proc_status_mb()
                res["rss_after_warmup_mb"] = m["VmRSS"]
                res["rss_anon_after_warmup_mb"] = m.get("RssAnon")
                res["rss_file_after_warmup_mb"] = m.get("RssFile")
            rates, loads, toks, discarded = [], [], None, 0
            for _ in range(runs):
                out, load, bad = guard.run(fn)
                r, toks = out if isinstance(out, tuple) else (out, None)
                rates.append(r)
                loads.append(load)
                discarded += bad
            res[name] = stats(rates)
            res[name]["foreign_busy_cores"] = loads
            res[name]["discarded_runs"] = discarded
            if toks is not None:
                res[name + "_tokens"] = toks
        except Exception as e:
            res[name] = None
            res[name + "_error"] = f"{type(e).__name__}: {e}"
    res["contention_wait_s"] = guard.waited

    end = proc_status_mb()
    res["rss_end_mb"] = end["VmRSS"]
    res["peak_rss_mb"] = end["VmHWM"]
    if args.profile:  # after the memory readings: the profiler allocates
        res["profile"] = profile_decode(args, methods, locals())
    return res


def profile_decode(args, methods, scope) -> str:
    """Top ops (self CPU time) over 20 raw decode steps (--profile; diagnostic only)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    steps = 20
    with torch.inference_mode():
        if args.engine == "quantchat":
            engine = scope["engine"]
            prompt = scope["decode_prompt"]
            logits = engine.prefill(list(prompt))
            tok, pos = int(torch.argmax(logits)), len(prompt)

            def step(tok, pos):
                return int(torch.argmax(engine.decode(torch.tensor([tok]), torch.tensor([pos]))[0]))
        else:
            from transformers import DynamicCache

            model, cache = scope["model"], None
            cache = DynamicCache(config=model.config)
            ids = scope["dec_ids"]
            tok = int(torch.argmax(model(ids, past_key_values=cache, logits_to_keep=1).logits[0, -1]))
            pos = ids.shape[1]

            def step(tok, pos):
                return int(torch.argmax(model(torch.tensor([[tok]]), past_key_values=cache).logits[0, -1]))
        for _ in range(5):  # warm
            tok = step(tok, pos)
            pos += 1
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                tok = step(tok, pos)
                pos += 1
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def wait_for_quiet(max_load: float, max_busy: float, max_wait: float, check_loadavg: bool) -> dict:
    """Wait (up to max_wait s) until the 1-min load average and the busy cores over 5 s are low."""
    t0 = time.time()
    last_msg = 0.0
    while True:
        load1 = os.getloadavg()[0]
        busy = busy_cores(5.0)
        ok = busy <= max_busy and (not check_loadavg or load1 <= max_load)
        waited = time.time() - t0
        if ok or waited >= max_wait:
            if not ok:
                print(f"  ! machine still busy after {waited:.0f} s (load {load1:.2f}, {busy:.2f} cores busy); "
                      "going on, numbers may be off", file=sys.stderr)
            return {"load1": load1, "busy_cores": busy, "waited_s": waited, "quiet": ok}
        if waited - last_msg >= 30 or last_msg == 0:
            print(f"  waiting for a quiet machine: load {load1:.2f}, {busy:.2f} cores busy "
                  f"({waited:.0f}/{max_wait:.0f} s)", file=sys.stderr)
            last_msg = waited or 1e-9


def run_worker(args: argparse.Namespace, engine: str, dtype: str, spec_path: Path) -> dict:
    cmd = [sys.executable, "-m", "quantchat.benchmark.core_bench", "--worker", "--engine", engine, "--dtype", dtype,
           "--spec", str(spec_path), "--threads", str(args.threads), "--runs", str(args.runs),
           "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len),
           "--max-busy", str(args.max_busy), "--max-wait", str(args.max_wait), "--retries", str(args.retries)]
    if args.profile:
        cmd.append("--profile")
    with ChildUsage() as usage:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=worker_env(args.threads), cwd=PACKAGE_ROOT)
    wall, child_cpu, foreign = usage.wall, usage.child_cpu, usage.foreign_busy_cores
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-25:])
        print(f"  ! worker {engine}/{dtype} failed (rc {proc.returncode}):\n{tail}", file=sys.stderr)
        return {"engine": engine, "dtype": dtype, "error": f"rc {proc.returncode}", "stderr_tail": tail}
    res = json.loads(lines[-1][len(RESULT_MARK):])
    res["worker_wall_s"] = wall
    res["worker_cpu_s"] = child_cpu
    res["foreign_busy_cores"] = foreign  # other processes' CPU use while this worker ran (whole worker)
    timed = [x for k in ("decode_generate", "decode_raw", "prefill", "prefill_all_logits") if res.get(k)
             for x in res[k].get("foreign_busy_cores", [])]
    res["max_foreign_busy_cores_timed"] = max(timed) if timed else None  # worst kept timed run
    res["discarded_runs"] = sum(res[k].get("discarded_runs", 0) for k in
                                ("decode_generate", "decode_raw", "prefill", "prefill_all_logits") if res.get(k))
    res["steal_cores"] = usage.steal_cores
    return res


def leading_agreement(a: list[int] | None, b: list[int] | None) -> int | None:
    if not a or not b:
        return None
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def ratio(a: dict | None, b: dict | None, key: str = "median") -> float | None:
    if not a or not b or not b.get(key):
        return None
    return a[key] / b[key]


def report(args, results: list[dict], meta: dict) -> str:
    lines = []
    lines.append(f"model: {meta['model']}  ({meta['hf_dir']})")
    lines.append(f"CPU: {meta['cpu_model']}, {meta['nproc']} cores; torch CPU capability {meta['torch_cpu_capability']}; "
                 f"flags: {' '.join(meta['cpu_flags']) or '?'}"
                 + ("" if {"avx512_bf16", "amx_bf16"} & set(meta["cpu_flags"]) else
                    " (no bf16 hardware: bf16 matrix products are emulated)"))
    lines.append(f"threads {args.threads}, runs {args.runs} (+1 warm-up), decode: {args.new_tokens} new tokens after a "
                 f"{DECODE_PROMPT_LEN}-token prompt, timed token 1→{args.new_tokens} "
                 f"(rate = {args.new_tokens - 1}/time); prefill: {args.prompt_len}-token prompt. "
                 "Median [min–max] tokens/s.")
    lines.append("")
    hdr = ("| engine | dtype | decode tok/s (generate) | decode tok/s (raw loop) | prefill tok/s | "
           "load s | RSS after load MB | RSS after 1st decode MB | peak RSS MB | other CPU load |")
    lines.append(hdr)
    lines.append("|---" * (hdr.count("|") - 1) + "|")
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['dtype']} | error: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['engine']} | {r['dtype']} | {fmt_stat(r.get('decode_generate'))} | {fmt_stat(r.get('decode_raw'))} | "
            f"{fmt_stat(r.get('prefill'), 0)} | {r['load_s']:.2f} | {r['rss_after_load_mb']:.0f} "
            f"(+{r['rss_load_delta_mb']:.0f}) | {r.get('rss_after_warmup_mb', float('nan')):.0f} "
            f"(file {r.get('rss_file_after_warmup_mb') or float('nan'):.0f}) | {r['peak_rss_mb']:.0f} | "
            f"{r.get('max_foreign_busy_cores_timed') or 0:.2f} cores ({r.get('discarded_runs', 0)} redone) |"
        )
    lines.append("")
    lines.append("RSS (MB = 1e6 bytes) is the whole process. After load, in brackets: growth during the load itself "
                 "(imports excluded); transformers maps the safetensors lazily, so its weights only count once touched: "
                 "compare 'after 1st decode' (in brackets: file-backed part, i.e. mmap'd weights/page cache). "
                 "other CPU load: the most CPU other processes used during a kept timed run (should be ~0; "
                 "runs disturbed by more than --max-busy cores are redone, up to --retries times).")
    extra = [r for r in results if r.get("prefill_all_logits")]
    for r in extra:
        lines.append(f"transformers {r['dtype']} prefill with logits for all {args.prompt_len} positions "
                     f"(plain model(ids)): {fmt_stat(r['prefill_all_logits'], 0)} tok/s")
    errs = [(r["engine"], r["dtype"], k, v) for r in results for k, v in r.items() if k.endswith("_error")]
    for e, d, k, v in errs:
        lines.append(f"! {e} {d} {k[:-6]}: {v}")
    for r in results:
        if r.get("engine") == "quantchat" and r.get("tokenizer_ok") not in (None, True):
            lines.append(f"note: quantchat tokenizer.encode failed ({r['tokenizer_ok']}); prompts are fixed ids anyway")

    by = {(r["engine"], r["dtype"]): r for r in results if "error" not in r}
    rows = []
    for dt in args.dtypes:
        q, h = by.get(("quantchat", dt)), by.get(("transformers", dt))
        if not q or not h:
            continue
        agree = leading_agreement(q.get("decode_raw_tokens") or q.get("decode_generate_tokens"),
                                  h.get("decode_generate_tokens") or h.get("decode_raw_tokens"))
        rows.append((dt, ratio(q.get("decode_generate"), h.get("decode_generate")),
                     ratio(q.get("decode_raw"), h.get("decode_raw")),
                     ratio(q.get("prefill"), h.get("prefill")),
                     q["load_s"] / h["load_s"] if h.get("load_s") else None,
                     q.get("rss_after_warmup_mb", 0) / h["rss_after_warmup_mb"] if h.get("rss_after_warmup_mb") else None,
                     agree))
    if rows:
        lines.append("")
        lines.append("Ratios quantchat / transformers (medians; > 1 = quantchat faster / for load and RSS: larger):")
        lines.append("")
        lines.append("| dtype | decode (generate) | decode (raw loop) | prefill | load time | RSS after 1st decode | "
                     "greedy tokens identical (of %d) |" % args.new_tokens)
        lines.append("|---|---|---|---|---|---|---|")

        def f(x):
            return "–" if x is None else f"{x:.2f}x"
        for dt, dg, dr, pf, ld, rss, agree in rows:
            lines.append(f"| {dt} | {f(dg)} | {f(dr)} | {f(pf)} | {f(ld)} | {f(rss)} | "
                         f"{'–' if agree is None else agree} |")
        targets = []
        for dt, dg, dr, pf, *_ in rows:
            if dt == "float32" and dg is not None:
                targets.append(f"float32 decode (generate) {dg:.2f}x (target >= 1.30x): "
                               f"{'MET' if dg >= 1.3 else 'NOT MET'}")
            if dt == "bfloat16" and pf is not None:
                targets.append(f"bfloat16 prefill {pf:.2f}x (target >= 1.00x): {'MET' if pf >= 1.0 else 'NOT MET'}")
        if targets:
            lines.append("")
            lines.extend("target: " + t for t in targets)
    return "\n".join(lines)


def save(out: Path, args, meta: dict, results: list[dict], partial: bool, profiles=None, text=None) -> None:
    Results("core-bench", {**run_meta(), **meta, "partial": partial}, {
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "engine", "dtype", "spec")},
        "results": results, "profiles": profiles or {}, "table": text}).write(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--engines", default="quantchat,transformers")
    ap.add_argument("--model", default=None, help="GGUF file or HF folder (default: the default model)")
    ap.add_argument("--out", default=str(Path(RESULTS_DIR) / "core.json"))
    ap.add_argument("--max-load", type=float, default=1.5,
                    help="wait before starting until the 1-min load average is below this")
    ap.add_argument("--max-busy", type=float, default=0.3,
                    help="before each worker, wait until other processes use at most this many cores (5 s window)")
    ap.add_argument("--max-wait", type=float, default=900, help="longest wait for a quiet machine, s (0: no wait)")
    ap.add_argument("--retries", type=int, default=5,
                    help="redo a timed run up to this many times when other processes used > --max-busy cores during it")
    ap.add_argument("--profile", action="store_true", help="also profile 20 raw decode steps per worker")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        res = worker(args)
        sys.stdout.write(RESULT_MARK + json.dumps(res) + "\n")
        return

    if args.runs < 1 or args.new_tokens < 2 or args.prompt_len < 1:
        ap.error("need --runs >= 1, --new-tokens >= 2, --prompt-len >= 1")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for d in args.dtypes:
        if d not in ("float32", "bfloat16"):
            ap.error(f"unknown dtype {d}")
    for e in args.engines:
        if e not in ("quantchat", "transformers"):
            ap.error(f"unknown engine {e}")

    from quantchat.loading.resolve import resolve_model  # torch: the driver imports it once the args are good

    src = resolve_model(args.model, progress=lambda m: print(f"  {m}", file=sys.stderr))  # converts once
    cfg = json.loads((src.hf_dir / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    spec = {
        "hf_dir": str(src.hf_dir),
        "decode_prompt": prompt_ids(vocab, DECODE_PROMPT_LEN, PROMPT_SEED),
        "prefill_prompt": prompt_ids(vocab, args.prompt_len, PROMPT_SEED + 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    def on_term(signum, frame):  # clean up and keep the partial results when terminated
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    fd, name = tempfile.mkstemp(prefix="core_bench_spec_", suffix=".json")
    os.close(fd)
    spec_path = Path(name)
    spec_path.write_text(json.dumps(spec))

    import torch

    meta = {"cpu_model": cpu_model_name(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_flags": cpu_flags(), "model": src.name, "hf_dir": str(src.hf_dir), "origin": str(src.origin), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "quiet_checks": []}
    results = []
    try:
        first = True
        for dt in args.dtypes:
            for eng in args.engines:
                if args.max_wait > 0:
                    meta["quiet_checks"].append(wait_for_quiet(args.max_load, args.max_busy, args.max_wait,
                                                               check_loadavg=first))
                first = False
                print(f"running {eng} {dt} ...", file=sys.stderr)
                r = run_worker(args, eng, dt, spec_path)
                if "error" not in r:
                    print(f"  decode {fmt_stat(r.get('decode_generate'))} (generate), "
                          f"{fmt_stat(r.get('decode_raw'))} (raw); prefill {fmt_stat(r.get('prefill'), 0)}; "
                          f"load {r['load_s']:.2f} s; RSS {r['rss_after_load_mb']:.0f} MB; "
                          f"other load {r['max_foreign_busy_cores_timed'] or 0:.2f} cores "
                          f"({r['discarded_runs']} runs redone)", file=sys.stderr)
                    if (r["max_foreign_busy_cores_timed"] or 0) > args.max_busy:
                        print("  ! other processes were busy during this run; numbers may be off", file=sys.stderr)
                results.append(r)
                save(out, args, meta, results, partial=True)
    finally:
        spec_path.unlink(missing_ok=True)

    text = report(args, results, meta)
    print(text)
    profiles = [(r["engine"], r["dtype"], r.pop("profile")) for r in results if r.get("profile")]
    for e, d, p in profiles:
        print(f"\n### profile: {e} {d}, 20 raw decode steps, top ops by self CPU time\n```\n{p}\n```")
    save(out, args, meta, results, partial=False, profiles={f"{e}/{d}": p for e, d, p in profiles}, text=text)
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
