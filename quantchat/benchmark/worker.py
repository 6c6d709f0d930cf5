"""One benchmark variant in a fresh process: ``python -m quantchat.benchmark.worker JOB.json RESULT.json``.

The job (JSON, written by the runner) names the engine (``quantchat`` or ``llama.cpp``), the model
(folder, or GGUF for llama.cpp), the load-time quantization, device, dtype, threads and what to measure.
The result (JSON) holds load time, memory readings, the decode per-token latencies and the time to
first token per prompt length; or ``{"error": ...}`` (exit status 2) for an error the user can fix.
Running each variant in its own process keeps load time and resident memory honest: no allocator
state, caches or imports carried over from an earlier variant. For the same reason each engine's imports
are made inside its function: the llama.cpp worker never loads torch, and quantchat's import time is timed.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from quantchat.errors import QuantchatError

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_quantchat(job: dict) -> dict:
    import torch

    from quantchat.benchmark.measure import (engine_step_fns, kv_cache_bytes, measure_speed, proc_status_mb,
                                             weight_bytes)
    from quantchat.engine.build import load_engine

    # one-time costs of any fresh process, kept out of the load time: the modules load_engine imports on
    # first use, and torch's lazy imports on the first module built on the meta device (seconds)
    for mod in ("quantchat.engine.generate", "quantchat.loading.hf_loader", "quantchat.quant.checkpoint",
                "quantchat.quant.quantize", "quantchat.tokenizer.tokenizer"):
        importlib.import_module(mod)

    with torch.device("meta"):
        torch.nn.Embedding(2, 2)
    kernels_s = None
    if job.get("quantized") and not job["device"].startswith("cuda"):
        # quantchat's CPU kernels: built once per machine (about 15 s) and loaded once per process
        from quantchat.kernels import cpu as cpu_kernels

        t0 = time.perf_counter()
        if not cpu_kernels.is_built():
            log("building quantchat's CPU kernels (once, about 15 s; not counted in the load time)...")
        cpu_kernels.available()
        kernels_s = time.perf_counter() - t0
    import_s = time.perf_counter() - T_START
    torch.set_num_threads(int(job["threads"]))
    device = job["device"]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    mem0 = proc_status_mb()
    t0 = time.perf_counter()
    loaded = load_engine(job["model"], device=device, dtype=job["dtype"], max_seq_len=int(job["max_seq_len"]),
                         progress=log, compile=bool(job.get("compile")), quant=job.get("quant"),
                         group_size=job.get("group_size"), kv_cache_dtype=job.get("kv_cache_dtype", "auto"))
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    mem1 = proc_status_mb()
    engine = loaded.engine
    model = engine.model
    cfg = model.config
    res: dict = {
        "engine": "quantchat", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": str(engine.device), "dtype": job["dtype"], "import_s": import_s, "load_s": load_s,
        "load_s_reported": loaded.load_s, "kernels_s": kernels_s, "compiled": bool(job.get("compile")),
        "n_params": cfg.n_params, "vocab_size": cfg.vocab_size, "context": cfg.max_position_embeddings,
        "max_seq_len": engine.max_seq_len, "weight_bytes": weight_bytes(model), "kv_cache_bytes": kv_cache_bytes(model),
        "rss_before_load_mb": mem0.get("VmRSS"), "rss_after_load_mb": mem1.get("VmRSS"),
        "rss_anon_after_load_mb": mem1.get("RssAnon"), "rss_file_after_load_mb": mem1.get("RssFile"),
    }
    qlin = next((m for m in model.modules() if hasattr(m, "own_kernel")), None)
    if qlin is not None:  # which low-bit kernels ran: quantchat's own (CPU, AVX2) or torch's
        res["quant_kernels"] = "quantchat" if qlin.own_kernel else "torch"
        if qlin.own_kernel:
            from quantchat.kernels import cpu as cpu_kernels

            res["kernel_variant"] = cpu_kernels.build_info().get("variant")
    if cuda:
        res["cuda_allocated_after_load_mb"] = torch.cuda.memory_allocated() / 1e6
    prefill, step = engine_step_fns(engine)
    res.update(measure_speed(prefill, step, cfg.vocab_size, engine.max_seq_len, job, engine.device, log))
    if cuda:
        res["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 1e6
        res["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved() / 1e6
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m quantchat.benchmark.worker JOB.json RESULT.json", file=sys.stderr)
        return 64
    job = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    try:
        if job.get("engine", "quantchat") == "llama.cpp":
            from quantchat.benchmark.llamacpp import measure_llamacpp

            res = measure_llamacpp(job)
        else:
            res = run_quantchat(job)
        res["label"] = job.get("label")
        res["worker_s"] = time.perf_counter() - T_START
        rc = 0
    except QuantchatError as e:
        res, rc = {"label": job.get("label"), "error": str(e)}, 2
    except Exception as e:  # noqa: BLE001 - reported by the runner with the traceback's tail
        res, rc = {"label": job.get("label"), "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-4000:]}, 1
    out.write_text(json.dumps(res))
    return rc


if __name__ == "__main__":
    sys.exit(main())
