"""``quantchat bench``: speed and memory of quantization variants of one model, side by side in one run.

For each variant (``none``, ``int8``, ``int4-sym``, ``int4-asym``, ``awq``, ``gptq``; ``METHOD:GROUP``
picks a group size) a fresh worker process (``quantchat.benchmark.worker``) loads the model and
measures load time, resident memory (RSS from /proc; on CUDA also ``torch.cuda.max_memory_allocated``),
the decode per-token latency (TinyChat's method: ``--warmup-steps`` untimed steps, then each of
``--steps`` single-token greedy decode steps timed on its own; median) and the time to first token for
each prompt length (median of ``--ttft-runs``; lengths not below the context are skipped, with a note).

int8 / int4-sym / int4-asym are quantized at load time (the size reported is then the packed weight
bytes in memory); awq / gptq are quantized once with ``quantchat quantize`` into a cache folder
(reused) and loaded from there. ``--synthetic`` benchmarks random-weight models with the shapes of
TinyLlama-1.1B or LLaMA-2-7B (``quantchat.benchmark.synthetic``). ``--peer llama.cpp`` measures
llama.cpp on the model's GGUF the same way (``quantchat.benchmark.llamacpp``) and prints ratios.

Outputs in ``--out`` (default ./quantchat-results/bench-<timestamp>/): results.json (every field, in the
``Results`` format of benchmark.results), results.md (the tables), and PNG plots (decode latency, TTFT vs
prompt length, memory). The methods come from quantchat.quant.methods.

Torch, the quantizer and matplotlib are imported inside the functions that need them: the CLI imports this
module at start-up (for its defaults), and ``quantchat --help`` must not load torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantchat.benchmark import llamacpp, measure
from quantchat.benchmark import synthetic as syn
from quantchat.benchmark.results import PACKAGE_ROOT, Results, run_meta
from quantchat.errors import QuantchatError
from quantchat.model.families import config_from_hf
from quantchat.paths import quantchat_home
from quantchat.quant import methods

VARIANTS = (methods.NONE, *methods.names())  # what --quant takes: float weights and every method
DEFAULT_QUANTS = "none,int8,int4-asym"
DEFAULT_PROMPT_LENGTHS = (64, 128, 256, 512, 1024, 2048)
PEERS = ("llama.cpp",)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MEMORY_HEADROOM = 0.9  # a variant runs only if its estimated memory is below this share of MemAvailable


@dataclass
class BenchOptions:
    model: str | None = None
    quants: str = DEFAULT_QUANTS
    group_size: int | None = None
    threads: int | None = None
    steps: int = 100
    warmup_steps: int = 10
    decode_context: int = 16
    prompt_lengths: list[int] = field(default_factory=lambda: list(DEFAULT_PROMPT_LENGTHS))
    ttft_runs: int = 3
    synthetic: str | None = None
    synthetic_overrides: dict | None = None  # shrink a synthetic model (tests)
    peer: str | None = None
    out: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    seed: int = measure.PROMPT_SEED
    plots: bool = True


@dataclass
class Variant:
    label: str
    method: str
    group_size: int | None
    family: str  # float / 8bit / 4bit: what a llama.cpp GGUF compares with
    model_path: str = ""
    quant: str | None = None  # quantized by the worker at load time
    load_path: str = ""  # float folder / quantized at load / quantized folder
    size_bytes: int | None = None
    size_kind: str = ""  # disk: files loaded; packed: packed weight bytes in memory (quantized at load)
    prepare_s: float = 0.0
    skipped: str | None = None
    note: str = ""


def parse_variants(text: str, group_size: int | None) -> list[tuple[str, int | None]]:
    """'none,int8,int4-asym:64,awq' -> [(method, group size or None)]; duplicates dropped."""
    out: list[tuple[str, int | None]] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        method, _, gs = item.partition(":")
        if method not in VARIANTS:
            raise QuantchatError(f"--quant: unknown variant '{method}'; choose from {', '.join(VARIANTS)}")
        if not is_grouped(method):
            if gs:
                raise QuantchatError(f"--quant: {method} takes no group size ('{item}')")
            g = None
        else:
            try:
                g = int(gs) if gs else (group_size or methods.DEFAULT_GROUP_SIZE)
            except ValueError:
                raise QuantchatError(f"--quant: bad group size in '{item}'") from None
            if g not in methods.GROUP_SIZES:
                sizes = ", ".join(map(str, methods.GROUP_SIZES))
                raise QuantchatError(f"--quant: group size must be {sizes.replace(', 256', ' or 256')} ('{item}')")
        if (method, g) not in out:
            out.append((method, g))
    if not out:
        raise QuantchatError("--quant: no variants given")
    return out


def variant_label(method: str, gs: int | None) -> str:
    return method if gs is None else f"{method} g{gs}"


def is_grouped(method: str) -> bool:
    """Whether a variant takes a group size: the 4-bit methods (int8 is per output channel)."""
    return method != methods.NONE and methods.get(method).bits == 4


def variant_family(method: str) -> str:
    """float / 8bit / 4bit: what a llama.cpp GGUF compares with."""
    return "float" if method == methods.NONE else f"{methods.get(method).bits}bit"


def default_out_dir() -> Path:
    return Path.cwd() / "quantchat-results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"


def folder_weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# running one worker
# ---------------------------------------------------------------------------------------------
def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_worker(job: dict, progress: Callable[[str], None], threads: int) -> dict:
    """Run one job in a fresh ``python -m quantchat.benchmark.worker`` process; its messages go to progress."""
    with tempfile.TemporaryDirectory(prefix="quantchat-bench-") as tmp:
        job_path, res_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        cmd = [sys.executable, "-m", "quantchat.benchmark.worker", str(job_path), str(res_path)]
        with measure.ChildUsage() as usage:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", env=worker_env(threads))
            tail: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail = (tail + [line])[-30:]
                if line.strip():
                    progress(f"    {line}")
            rc = proc.wait()
        try:
            res = json.loads(res_path.read_text())
        except (OSError, json.JSONDecodeError):
            res = {"error": f"worker exited with status {rc} without a result", "output_tail": "\n".join(tail)}
    if rc != 0 and "error" not in res:
        res["error"] = f"worker exited with status {rc}"
    res["worker_wall_s"] = usage.wall
    res["worker_cpu_s"] = usage.child_cpu
    res["foreign_busy_cores"] = usage.foreign_busy_cores
    res["steal_cores"] = usage.steal_cores
    return res


# ---------------------------------------------------------------------------------------------
# preparing variants
# ---------------------------------------------------------------------------------------------
def _bench_cache() -> Path:
    return quantchat_home() / "bench"


def _source_key(hf_dir: Path) -> str:
    h = hashlib.sha256(str(Path(hf_dir).resolve()).encode())
    for p in sorted(Path(hf_dir).glob("*.safetensors")) + [Path(hf_dir) / "config.json"]:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:10]


def quantize_cached(hf_dir: Path, name: str, method: str, gs: int, threads: int, context: int,
                    progress: Callable[[str], None]) -> tuple[Path, float, bool]:
    """awq/gptq folder of a model in the bench cache, made with ``quantchat quantize`` when missing.

    Returns (folder, seconds spent quantizing, whether it was reused)."""
    from quantchat.quant.checkpoint import is_quantized_dir  # torch

    out = _bench_cache() / "quantized" / f"{name}-{_source_key(hf_dir)}-{method}-g{gs}"
    if is_quantized_dir(out) and (out / "manifest.json").is_file():
        progress(f"  reusing {out}")
        return out, 0.0, True
    progress(f"  quantizing with {method} (calibration; minutes on a real model) into {out} ...")
    cmd = [sys.executable, "-m", "quantchat", "quantize", str(hf_dir), "--method", method, "--group-size", str(gs),
           "--out", str(out), "--force", "--threads", str(threads),
           "--calib-seq-len", str(min(512, max(16, context)))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=worker_env(threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace")
    if proc.returncode != 0:
        last = (proc.stdout.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise QuantchatError(f"quantizing with {method} failed: {last.strip()}")
    return out, time.perf_counter() - t0, False


def _disk_free(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def prepare_synthetic(v: Variant, name: str, cfg: dict, dtype: str, progress: Callable[[str], None]) -> None:
    """Build (or reuse) the synthetic folder of a variant; sets v.model_path / size, or v.skipped."""
    from quantchat.quant.checkpoint import FORMAT_VERSION  # torch

    kind = dtype if v.method == "none" else \
        (v.method if v.group_size is None else f"{v.method}-g{v.group_size}") + f"-v{FORMAT_VERSION}"
    folder = _bench_cache() / "synthetic" / syn.cache_name(name, cfg, kind)
    need = syn.float_bytes(cfg, dtype) if v.method == "none" else syn.quantized_bytes(cfg, v.method, v.group_size)
    avail = measure.mem_available_bytes()
    if avail is not None and need > avail * MEMORY_HEADROOM:
        hint = " (try --dtype bfloat16, or leave 'none' out)" if v.method == "none" and dtype == "float32" else ""
        v.skipped = (f"needs about {need / 1e9:.1f} GB of memory for its weights; {avail / 1e9:.1f} GB available"
                     + hint)
        return
    if not syn.is_complete(folder):
        free = _disk_free(folder.parent)
        if need * 1.05 > free:
            v.skipped = f"needs about {need / 1e9:.1f} GB of disk in {folder.parent}; {free / 1e9:.1f} GB free"
            return
        progress(f"  building synthetic {name} ({kind}, {need / 1e9:.2f} GB of random weights) in {folder} ...")
        t0 = time.perf_counter()
        if v.method == "none":
            syn.build_float_model(folder, cfg, dtype, name, progress=progress)
        else:
            syn.build_quantized_model(folder, cfg, v.method, v.group_size, name, progress=progress)
        v.prepare_s = time.perf_counter() - t0
    else:
        progress(f"  reusing {folder}")
    v.model_path = str(folder)
    v.size_bytes, v.size_kind = folder_weight_bytes(folder), "disk"
    v.load_path = "float folder" if v.method == "none" else "quantized folder (random codes)"
    if v.method != methods.NONE and methods.get(v.method).calibrated:
        v.note = f"synthetic: random codes in {v.method}'s packed int4 layout (no calibration)"


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def validate(opts: BenchOptions) -> None:
    if opts.steps < 1:
        raise QuantchatError("--steps must be at least 1")
    if opts.warmup_steps < 0:
        raise QuantchatError("--warmup-steps must be at least 0")
    if opts.decode_context < 1:
        raise QuantchatError("--decode-context must be at least 1")
    if opts.ttft_runs < 1:
        raise QuantchatError("--ttft-runs must be at least 1")
    if any(L < 1 for L in opts.prompt_lengths):
        raise QuantchatError("--prompt-lengths must be positive")
    if opts.threads is not None and opts.threads < 1:
        raise QuantchatError("--threads must be at least 1")
    if opts.peer is not None and opts.peer not in PEERS:
        raise QuantchatError(f"--peer: unknown peer '{opts.peer}'; supported: {', '.join(PEERS)}")
    if opts.synthetic and opts.model:
        raise QuantchatError("give either --model or --synthetic, not both")
    if opts.dtype not in ("auto", *DTYPE_BYTES):
        raise QuantchatError(f"--dtype: unknown dtype '{opts.dtype}'")


def estimate_memory(v: Variant, n_params: int, dtype: str, kv_bytes: int) -> int:
    """Peak host memory a variant needs (weights + KV cache), roughly, to refuse hopeless runs early."""
    if v.load_path == "float folder" or v.quant:  # float weights (load-time quantization starts from them)
        return n_params * DTYPE_BYTES[dtype] + kv_bytes
    return (v.size_bytes or 0) + kv_bytes


def run_bench(opts: BenchOptions, progress: Callable[[str], None] | None = None) -> Results:
    """Run the whole benchmark; writes results.json / results.md / plots into the output folder; returns the report."""
    progress = progress or (lambda m: print(m, file=sys.stderr, flush=True))
    validate(opts)
    specs = parse_variants(opts.quants, opts.group_size)
    peer_version = None
    if opts.peer:  # fail before any slow work
        peer_version = llamacpp.require_llama_cpp()
        if opts.synthetic:
            raise QuantchatError("--peer llama.cpp needs the model as a GGUF file; synthetic models have none "
                                 "(benchmark a .gguf with --model instead)")

    from quantchat.engine.build import pick_device  # torch
    from quantchat.loading.resolve import resolve_model

    dev = pick_device(opts.device)
    device = str(dev)
    cuda = dev.type == "cuda"
    dtype = opts.dtype if opts.dtype != "auto" else ("bfloat16" if cuda else "float32")
    threads = opts.threads or os.cpu_count() or 1
    out_dir = Path(opts.out) if opts.out else default_out_dir()

    source: dict = {}
    if opts.synthetic:
        cfg = syn.synthetic_config(opts.synthetic, opts.synthetic_overrides)
        source = {"name": opts.synthetic, "synthetic": True, "note": syn.SYNTHETIC_NOTE}
    else:
        from quantchat.quant.checkpoint import is_quantized_dir  # torch

        src = resolve_model(opts.model, progress=progress)
        cfg = json.loads((src.hf_dir / "config.json").read_text())
        source = {"name": src.name, "hf_dir": str(src.hf_dir), "origin": str(src.origin), "synthetic": False}
        if src.origin.is_file():
            source["origin_bytes"] = src.origin.stat().st_size
        if is_quantized_dir(src.hf_dir):
            source["quantized"] = cfg.get("quantization_config")
            bad = [m for m, _ in specs if m != "none"]
            if bad:
                raise QuantchatError(f"{src.hf_dir} is already quantized: benchmark it with --quant none "
                                     f"(or give the original model for {', '.join(bad)})")
    mcfg = config_from_hf(cfg, source=source["name"])
    context = mcfg.max_position_embeddings
    decode_need = opts.decode_context + opts.warmup_steps + opts.steps
    if decode_need >= context:
        raise QuantchatError(f"--decode-context + --warmup-steps + --steps = {decode_need} tokens does not fit the "
                             f"model's context of {context} tokens; use fewer steps")
    kept = [L for L in dict.fromkeys(opts.prompt_lengths) if L < context]
    notes: list[str] = []
    for L in dict.fromkeys(opts.prompt_lengths):
        if L >= context:
            notes.append(f"prompt length {L} skipped: not below the model's context of {context} tokens")
            progress(f"note: {notes[-1]}")
    max_seq_len = min(context, max([decode_need + 1] + [L + 1 for L in kept]))
    kv_bytes = 2 * mcfg.n_layer * max_seq_len * mcfg.n_kv_head * mcfg.head_dim * DTYPE_BYTES[dtype]
    if source.get("synthetic"):
        notes.append(f"synthetic model ({opts.synthetic}): {source['note']}")

    variants = [Variant(variant_label(m, g), m, g, variant_family(m)) for m, g in specs]
    if source.get("quantized"):  # a quantized folder runs as it is: name it by its method
        q = source["quantized"]
        qm, qg = q.get("method", "?"), q.get("group_size")
        for v in variants:
            v.method, v.group_size = qm, qg
            v.label, v.family = f"{variant_label(qm, qg)} (folder)", variant_family(qm)
    peers: list[dict] = []
    if opts.peer:
        progress("llama.cpp peer: finding or exporting GGUF files ...")
        peers, peer_notes = plan_peers(source, variants, threads, progress)
        notes.extend(peer_notes)

    meta = {**run_meta(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), **measure.machine_info(),
            "quantchat_device": device, "dtype": dtype, "threads": threads, "llama_cpp_python": peer_version}
    report = Results("bench", meta, {
        "source": source,
        "options": {**asdict(opts), "device": device, "dtype": dtype, "threads": threads,
                    "prompt_lengths_kept": kept,
                    "prompt_lengths_skipped": [L for L in dict.fromkeys(opts.prompt_lengths) if L >= context],
                    "max_seq_len": max_seq_len, "context": context},
        "model": {"n_params": mcfg.n_params, "n_layer": mcfg.n_layer, "dim": mcfg.dim, "n_head": mcfg.n_head,
                  "n_kv_head": mcfg.n_kv_head, "intermediate_size": mcfg.intermediate_size,
                  "vocab_size": mcfg.vocab_size, "context": context},
        "method": ("decode: after a fixed {c}-token prompt, {w} untimed warm-up steps, then {s} single-token greedy "
                   "decode steps each timed on its own (device synchronized); median latency, tokens/s = 1000 / "
                   "median ms. TTFT: a prompt of fixed token ids into an empty KV cache to its first greedy token, "
                   "median of {r} runs. Each variant runs in a fresh process.").format(
                       c=opts.decode_context, w=opts.warmup_steps, s=opts.steps, r=opts.ttft_runs),
        "variants": [], "peers": [], "ratios": [], "notes": notes, "partial": True,
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    progress(f"bench: {source['name']} ({mcfg.n_params / 1e6:.0f}M params), {len(variants)} variant(s), "
             f"{device} {dtype}, {threads} thread(s); results in {out_dir}")

    if not cuda and (any(v.method != "none" for v in variants) or source.get("quantized")):
        # build quantchat's CPU kernels here, once, so that no worker's memory or time includes a compile
        from quantchat.kernels import cpu as cpu_kernels  # torch

        if not cpu_kernels.is_built():
            progress("building quantchat's CPU kernels (once, about 15 s)...")
        if not cpu_kernels.available():
            notes.append(f"quantchat's CPU kernels are unavailable ({cpu_kernels.unavailable_reason()}): "
                         "quantized variants use torch's slower kernels")
        else:
            info = cpu_kernels.build_info()
            meta["kernels"] = {k: info.get(k) for k in ("variant", "why", "isa")}
            meta["kernels_variant"] = info.get("variant")
    if opts.peer:
        meta["llama_cpp_build"] = llamacpp.peer_build_info()
    job_base = {"device": device, "dtype": dtype, "threads": threads, "steps": opts.steps,
                "warmup_steps": opts.warmup_steps, "decode_context": opts.decode_context, "prompt_lengths": kept,
                "ttft_runs": opts.ttft_runs, "max_seq_len": max_seq_len, "seed": opts.seed, "compile": opts.compile}
    def report_row(row: dict, label: str) -> None:
        """Print one measured row (or its failure, also kept as a note)."""
        if "error" in row:
            progress(f"  ! failed: {row['error']}")
            notes.append(f"{label} failed: {row['error']}")
        else:
            progress("  " + summary_line(row))

    for i, v in enumerate(variants, 1):
        progress(f"[{i}/{len(variants)}] {v.label}")
        try:
            if opts.synthetic:
                prepare_synthetic(v, opts.synthetic, cfg, dtype, progress)
            else:
                prepare_variant(v, source, context, threads, progress)
        except QuantchatError as e:
            v.skipped = f"preparation failed: {e}"
        if not v.skipped and not cuda:
            need = estimate_memory(v, mcfg.n_params, dtype, kv_bytes)
            avail = measure.mem_available_bytes()
            if avail is not None and need > avail * MEMORY_HEADROOM:
                v.skipped = f"needs about {need / 1e9:.1f} GB of memory; {avail / 1e9:.1f} GB available"
        row = asdict(v)
        if v.skipped:
            progress(f"  skipped: {v.skipped}")
            notes.append(f"{v.label} skipped: {v.skipped}")
        else:
            res = run_worker({**job_base, "engine": "quantchat", "label": v.label, "model": v.model_path,
                              "quant": v.quant, "group_size": v.group_size,
                              "quantized": v.method != "none" or bool(source.get("quantized"))}, progress, threads)
            row.update(res)
            row["engine"] = "quantchat"
            if v.size_kind == "packed" and res.get("weight_bytes") is not None:
                row["size_bytes"] = res["weight_bytes"]
            report_row(row, v.label)
        report["variants"].append(row)
        save_json(out_dir, report)

    for i, p in enumerate(peers, 1):
        progress(f"[peer {i}/{len(peers)}] {p['label']} ({p['gguf']})")
        res = run_worker({**job_base, "engine": "llama.cpp", "label": p["label"], "model": p["gguf"]},
                         progress, threads)
        row = {**p, **res, "engine": "llama.cpp"}
        report_row(row, p["label"])
        report["peers"].append(row)
        save_json(out_dir, report)

    report["ratios"] = peer_ratios(report["variants"], report["peers"])
    foreign = [r.get("foreign_busy_cores") or 0 for r in report["variants"] + report["peers"]]
    if foreign and max(foreign) > 0.3:
        notes.append(f"other processes used up to {max(foreign):.1f} CPU cores during the run: "
                     "timings may be off; re-run on a quiet machine")
    report["partial"] = False
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_outputs(out_dir, report, plots=opts.plots, progress=progress)
    return report


def prepare_variant(v: Variant, source: dict, context: int, threads: int, progress: Callable[[str], None]) -> None:
    hf_dir = Path(source["hf_dir"])
    if source.get("quantized"):
        v.model_path, v.load_path = str(hf_dir), "quantized folder"
        v.size_bytes, v.size_kind = folder_weight_bytes(hf_dir), "disk"
    elif v.method == "none":
        v.model_path, v.load_path = str(hf_dir), "float folder"
        v.size_bytes, v.size_kind = folder_weight_bytes(hf_dir), "disk"
        if str(source.get("origin", "")).lower().endswith(".gguf"):
            v.note = "loads the float32 folder converted from the GGUF"
    elif methods.get(v.method).load_time:
        v.model_path, v.quant, v.load_path = str(hf_dir), v.method, "quantized at load"
        v.size_kind = "packed"  # filled in from the worker's weight bytes
    else:
        folder, secs, reused = quantize_cached(hf_dir, source["name"], v.method, v.group_size or 128, threads,
                                               context, progress)
        v.model_path, v.load_path = str(folder), "quantized folder"
        v.size_bytes, v.size_kind, v.prepare_s = folder_weight_bytes(folder), "disk", secs
        v.note = "quantized folder reused from the cache" if reused else f"quantized in {secs:.0f} s"


def export_peer_gguf(source: dict, qtype: str, threads: int, progress: Callable[[str], None]) -> Path:
    """A GGUF of the source model with ``qtype`` linears, made once with ``quantchat export-gguf`` (cached)."""
    hf_dir = Path(source["hf_dir"])
    out = _bench_cache() / "gguf" / f"{source['name']}-{_source_key(hf_dir)}-{qtype}.gguf"
    if out.is_file():
        progress(f"  reusing {out}")
        return out
    model = source.get("origin") or str(hf_dir)
    progress(f"  exporting {qtype} GGUF for llama.cpp into {out} ...")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "quantchat", "export-gguf", model, "--type", qtype, "--out", str(out), "--force",
           "--threads", str(threads)]
    proc = subprocess.run(cmd, env=worker_env(threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace")
    if proc.returncode != 0 or not out.is_file():
        last = (proc.stdout.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise QuantchatError(f"GGUF export ({qtype}) failed: {last.strip()}")
    return out


def plan_peers(source: dict, variants: list[Variant], threads: int,
               progress: Callable[[str], None] | None = None) -> tuple[list[dict], list[str]]:
    """The GGUF files llama.cpp runs, and notes.

    The model's own GGUF (when it is one) runs as it is; for each quantchat variant whose GGUF type
    (int8: q8_0, int4-sym: q4_0, int4-asym / awq / gptq: q4_1) the own GGUF does not already have, a
    GGUF is exported from the same source model with ``quantchat export-gguf`` (cached). Without an
    own GGUF and with no export possible this is an error. The types come from quant.methods
    (``peer_gguf_type``; GGUF blocks are 32 weights, whatever the group size).
    """
    progress = progress or (lambda m: None)
    notes: list[str] = []
    peers: list[dict] = []

    def add(path: Path, how: str) -> None:
        types = llamacpp.gguf_types(path)
        main = llamacpp.gguf_main_type(types)
        peers.append({"label": f"llama.cpp {main}", "gguf": str(path), "gguf_main_type": main, "gguf_types": types,
                      "family": llamacpp.gguf_bits_family(main), "gguf_type": main.lower(), "gguf_origin": how,
                      "size_bytes": path.stat().st_size, "size_kind": "disk"})

    origin = Path(source.get("origin") or "")
    if origin.suffix.lower() == ".gguf" and origin.is_file():
        add(origin, "the model's own GGUF")
    have = {p["gguf_type"] for p in peers}
    wanted = [peer_gguf_type(v.method) for v in variants if peer_gguf_type(v.method)]
    for qtype in dict.fromkeys(wanted):
        if qtype in have:
            continue
        try:
            add(export_peer_gguf(source, qtype, threads, progress), "exported with quantchat export-gguf")
        except QuantchatError as e:
            notes.append(f"no llama.cpp {qtype} peer: {e}")
            progress(f"  ! {notes[-1]}")
    if not peers:
        raise QuantchatError("--peer llama.cpp needs a GGUF of the model: give --model FILE.gguf (or leave --model "
                             "out for the default model's GGUF)" + (f"; {notes[-1]}" if notes else ""))
    notes.append("llama.cpp's GGUF types quantize in blocks of 32 weights (q4_0: scale; q4_1: scale + min; "
                 "q8_0: scale), whatever quantchat's group size; its token embedding / head types may differ too")
    return peers, notes


def peer_gguf_type(method: str) -> str | None:
    """The GGUF type llama.cpp runs beside a quantchat variant (None for float weights)."""
    return None if method == methods.NONE or method not in methods.METHODS else methods.get(method).peer_gguf_type


def peer_ratios(variants: list[dict], peers: list[dict]) -> list[dict]:
    """quantchat / llama.cpp speed ratios (> 1: quantchat faster) for every measured variant and peer."""
    out = []
    for p in peers:
        if "error" in p or "decode" not in p:
            continue
        p_ttft = {t["prompt_len"]: t["ms"]["median"] for t in p.get("ttft", []) if "ms" in t}
        for v in variants:
            if "decode" not in v:
                continue
            v_ttft = {t["prompt_len"]: t["ms"]["median"] for t in v.get("ttft", []) if "ms" in t}
            out.append({
                "variant": v["label"], "peer": p["label"], "same_bits": v.get("family") == p.get("family"),
                "same_type": peer_gguf_type(v.get("method", "")) == p.get("gguf_type"),
                "decode_speed": p["decode"]["latency_ms"]["median"] / v["decode"]["latency_ms"]["median"],
                "ttft_speed": {str(L): p_ttft[L] / v_ttft[L] for L in v_ttft if L in p_ttft and v_ttft[L] > 0},
                "rss": (v.get("rss_mb") or 0) / p["rss_mb"] if p.get("rss_mb") else None,
            })
    return out


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def summary_line(r: dict) -> str:
    d = r["decode"]
    ttft = ", ".join(f"{t['prompt_len']}: {t['ms']['median']:.0f}" for t in r.get("ttft", []) if "ms" in t)
    mem = f"RSS {r.get('rss_mb') or 0:.0f} MB (peak {r.get('peak_rss_mb') or 0:.0f})"
    if r.get("cuda_max_allocated_mb") is not None:
        mem += f", GPU max {r['cuda_max_allocated_mb']:.0f} MB"
    return (f"decode {d['latency_ms']['median']:.2f} ms/token ({d['tokens_per_s']:.1f} tok/s); "
            f"TTFT ms {{{ttft}}}; load {r.get('load_s', 0):.2f} s; {mem}")


def save_json(out_dir: Path, report: Results) -> Path:
    return report.write(out_dir / "results.json")


def table_rows(report: Results) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (shared by the rich and the markdown output)."""
    lengths = report["options"]["prompt_lengths_kept"]
    gpu = any(r.get("cuda_max_allocated_mb") is not None for r in report["variants"])
    engines = bool(report["peers"])
    header = ["variant"] + (["engine"] if engines else []) + ["size MB", "load s", "RSS MB", "peak RSS MB"] + \
        (["GPU max MB"] if gpu else []) + ["decode ms/token", "tokens/s"] + [f"TTFT@{L} ms" for L in lengths]
    rows = []
    for r in report["variants"] + report["peers"]:
        size = "–" if r.get("size_bytes") is None else \
            f"{r['size_bytes'] / 1e6:.1f}{'†' if r.get('size_kind') == 'packed' else ''}"
        row = [r["label"]] + ([r.get("engine", "quantchat")] if engines else []) + [size]
        if r.get("skipped") or r.get("error"):
            why = f"skipped: {r['skipped']}" if r.get("skipped") else f"error: {r['error']}"
            rows.append(row + [why] + [""] * (len(header) - len(row) - 1))
            continue
        ttft = {t["prompt_len"]: t for t in r.get("ttft", [])}
        row += [f"{r['load_s']:.2f}", f"{r.get('rss_mb') or 0:.0f}", f"{r.get('peak_rss_mb') or 0:.0f}"]
        if gpu:
            row.append("–" if r.get("cuda_max_allocated_mb") is None else f"{r['cuda_max_allocated_mb']:.0f}")
        d = r["decode"]
        row += [f"{d['latency_ms']['median']:.2f} [{d['latency_ms']['p10']:.2f}–{d['latency_ms']['p90']:.2f}]",
                f"{d['tokens_per_s']:.1f}"]
        for L in lengths:
            t = ttft.get(L)
            row.append("–" if t is None else ("skipped" if "skipped" in t else f"{t['ms']['median']:.1f}"))
        rows.append(row)
    return header, rows


def ratio_rows(report: Results) -> tuple[list[str], list[list[str]]]:
    lengths = report["options"]["prompt_lengths_kept"]
    header = ["variant", "vs", "match", "decode speed"] + [f"TTFT@{L} speed" for L in lengths] + ["RSS ratio"]
    rows = []
    matched = {q["variant"] for q in report["ratios"] if q.get("same_type") or q["same_bits"]}
    for q in report["ratios"]:  # like-for-like pairs; a variant without one is shown against every peer
        if q["variant"] in matched and not (q.get("same_type") or q["same_bits"]):
            continue
        match = "type" if q.get("same_type") else ("bits" if q["same_bits"] else "no")
        rows.append([q["variant"], q["peer"], match, f"{q['decode_speed']:.2f}x"]
                    + [f"{q['ttft_speed'][str(L)]:.2f}x" if str(L) in q["ttft_speed"] else "–" for L in lengths]
                    + ["–" if q["rss"] is None else f"{q['rss']:.2f}x"])
    return header, rows


def header_lines(report: Results) -> list[str]:
    m, o, src, mdl = report["meta"], report["options"], report["source"], report["model"]
    lines = [f"model: {src['name']} ({mdl['n_params'] / 1e6:.0f}M params, {mdl['n_layer']} layers, dim {mdl['dim']}, "
             f"context {mdl['context']})" + (" — SYNTHETIC: " + src["note"] if src.get("synthetic") else ""),
             f"machine: {m['cpu_model']}, {m['nproc']} cores" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
             + f"; torch {m.get('torch', '?')}; device {o['device']}, {o['dtype']}, {o['threads']} thread(s)"
             + (f"; llama-cpp-python {m['llama_cpp_python']}" if m.get("llama_cpp_python") else ""),
             f"method: {report['method']}"]
    k = m.get("kernels")
    if k:
        lines.append(f"quantchat kernels: {k['variant']} ({k['why']}): {k['isa']}")
    b = m.get("llama_cpp_build")
    if b:
        lines.append(f"llama.cpp build: {b.get('cmake_args') or 'unknown flags (not built by scripts/build_llamacpp_peer.sh)'}"
                     f"; {b.get('system_info', '')}")
    return lines


FOOTNOTES = ("size: safetensors files loaded (llama.cpp: the GGUF file); † packed weight bytes in memory "
             "(quantized at load time). RSS: whole process after the decode measurement (weights, KV cache of "
             "max_seq_len positions, buffers, the Python/torch runtime); peak RSS: the process's high-water mark. "
             "decode ms/token: median [p10–p90].")


def markdown(report: Results) -> str:
    def table(header, rows):
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
        return out

    lines = ["# quantchat bench", ""] + [f"- {x}" for x in header_lines(report)] + [""]
    lines += table(*table_rows(report)) + ["", FOOTNOTES]
    if report["ratios"]:
        lines += ["", "## quantchat / llama.cpp (speed ratios: > 1 = quantchat faster; RSS: quantchat / llama.cpp)",
                  ""] + table(*ratio_rows(report))
    if report["notes"]:
        lines += ["", "## notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def print_rich(report: Results) -> None:
    console = Console()
    if not console.is_terminal:  # piped into a file: don't squeeze the table into 80 columns
        console = Console(width=200)
    for line in header_lines(report):
        console.print(line, markup=False, highlight=False)
    header, rows = table_rows(report)
    t = Table(title="quantchat bench")
    for h in header:
        t.add_column(h, justify="left" if h in ("variant", "engine") else "right", overflow="fold")
    for r in rows:
        t.add_row(*r)
    console.print(t)
    console.print(FOOTNOTES, markup=False, highlight=False)
    if report["ratios"]:
        header, rows = ratio_rows(report)
        t = Table(title="quantchat / llama.cpp (speed: > 1 = quantchat faster; RSS ratio: quantchat / llama.cpp)")
        for h in header:
            t.add_column(h, justify="left" if h in ("variant", "vs") else "right")
        for r in rows:
            t.add_row(*r)
        console.print(t)
    for n in report["notes"]:
        console.print(f"note: {n}", markup=False, highlight=False)


def write_outputs(out_dir: Path, report: Results, plots: bool = True,
                  progress: Callable[[str], None] | None = None) -> list[Path]:
    files = [save_json(out_dir, report)]
    (out_dir / "results.md").write_text(markdown(report))
    files.append(out_dir / "results.md")
    if plots:
        from quantchat.benchmark.plots import make_plots  # matplotlib: kept off the CLI's start-up path

        files += make_plots(report, out_dir)
    report.fields["files"] = [str(f) for f in files]
    save_json(out_dir, report)
    if progress:
        progress(f"wrote {', '.join(f.name for f in files)} in {out_dir}")
    return files
