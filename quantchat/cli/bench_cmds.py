"""``quantchat bench``: decode latency, time to first token, load time and memory per quantization variant.

``quantchat bench [options]`` runs the speed/memory benchmark (quantchat.benchmark.runner);
``quantchat bench serve ...`` the serving throughput benchmark (quantchat.benchmark.serving). The other
benchmarks of the package run as ``python -m quantchat.benchmark.core_bench | kernel_bench | quant_bench``
(see docs/benchmarks.md). The benchmark modules that load torch are imported when their command runs.
"""

from __future__ import annotations

import argparse

from quantchat import envs
from quantchat.benchmark.runner import DEFAULT_PROMPT_LENGTHS, DEFAULT_QUANTS, PEERS, VARIANTS, BenchOptions
from quantchat.benchmark.synthetic import SYNTHETIC_CONFIGS
from quantchat.cli.common import add_kv_cache_arg, packed_gguf_default, status
from quantchat.errors import QuantchatError
from quantchat.quant import methods


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from quantchat.benchmark.runner import print_rich, run_bench

    if args.threads is not None and args.threads < 1:
        raise QuantchatError("--threads must be at least 1")
    opts = BenchOptions(
        model=args.model, quants=args.quant, group_size=args.group_size, threads=args.threads, steps=args.steps,
        warmup_steps=args.warmup_steps, decode_context=args.decode_context, prompt_lengths=args.prompt_lengths,
        ttft_runs=args.ttft_runs, synthetic=args.synthetic, peer=args.peer, out=args.out, device=args.device,
        dtype=args.dtype, compile=args.compile, plots=not args.no_plots,
    )
    report = run_bench(opts, progress=status)
    print_rich(report)
    measured = [r for r in report["variants"] if "decode" in r]
    return 0 if measured else 1


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="HF folder, .gguf file or quantized folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quant", default=DEFAULT_QUANTS,
                   help=f"comma-separated variants: {', '.join(VARIANTS)}; METHOD:GROUP sets a "
                        f"group size (default: {DEFAULT_QUANTS})")
    p.add_argument("--group-size", type=int, default=None, help="int4/awq/gptq group size (default 128)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, same for every engine (default: all cores)")
    p.add_argument("--steps", type=int, default=100, help="timed decode steps per variant (default 100)")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed decode steps first (default 10)")
    p.add_argument("--decode-context", type=int, default=16, help="prompt tokens before decoding (default 16)")
    p.add_argument("--prompt-lengths", type=int_list, default=list(DEFAULT_PROMPT_LENGTHS),
                   help="prompt lengths for time to first token (default: 64,128,256,512,1024,2048)")
    p.add_argument("--ttft-runs", type=int, default=3, help="runs per prompt length, median (default 3)")
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC_CONFIGS), default=None,
                   help="random-weight model of these published shapes (speed/memory only; quality meaningless)")
    p.add_argument("--peer", choices=list(PEERS), default=None,
                   help="also measure llama.cpp, same threads and prompts: on the model's own GGUF and on GGUFs "
                        "exported for the variants (int8: q8_0, int4-sym: q4_0, int4-asym/awq/gptq: q4_1); "
                        "needs llama-cpp-python (pip install 'quantchat[peer]')")
    p.add_argument("--out", default=None, help="output folder (default: ./quantchat-results/bench-<timestamp>/)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activation/weight float type (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed and memory per quantization variant (decode latency, TTFT, RSS)",
                       description="Measure load time, memory, decode per-token latency and time to first token "
                                   "of quantization variants of one model, each in a fresh process.")
    add_run_args(p)
    p.set_defaults(func=cmd_bench)
    bench_sub = p.add_subparsers(dest="bench_command", required=False, metavar="SUBCOMMAND")
    register_serve(bench_sub)
    register_structured(bench_sub)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from quantchat.benchmark.serving import run_bench_serve  # httpx, aiohttp, matplotlib: not at start-up

    if args.locust:
        if args.url:
            raise QuantchatError("--locust starts its own fleet (to kill a worker): drop --url")
        from quantchat.benchmark.locust_load import run_locust

        return run_locust(args, status)
    return run_bench_serve(args, status)


def register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="throughput, latency and TTFT with concurrent clients (1 vs 2 workers)")
    p.add_argument("--url", default=None, help="drive this running server instead of starting one")
    p.add_argument("--api-key", default=envs.QUANTCHAT_API_KEY, help="API key for --url")
    p.add_argument("--model", "-m", default=None, help="model for the servers started here (default: embedded)")
    p.add_argument("--quant", default="int4-asym", choices=[methods.NONE, *methods.load_time_names()],
                   help="quantization of the started servers (default int4-asym)")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=1024)
    add_kv_cache_arg(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads in total (split between workers)")
    p.add_argument("--clients", type=int_list, default=[1, 4, 8], help="concurrent clients (default 1,4,8)")
    p.add_argument("--workers", type=int_list, default=[1, 2],
                   help="worker counts behind a controller, at the largest client count (default 1,2; '' = none)")
    p.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat the client sweep this many times, interleaved; report medians (default 3)")
    p.add_argument("--out", default=None, help="output folder (default ./quantchat-results/bench-serve-<time>/)")
    g = p.add_argument_group("locust (--locust): a fleet under load, one worker killed")
    g.add_argument("--locust", action="store_true",
                   help="run locust headless against controller + workers (largest of --workers, default 2) + API on "
                        "loopback, kill one worker while it runs, report requests, failures, p50/p95 latency and "
                        "check that only requests in flight on it failed")
    g.add_argument("--users", type=int, default=16, help="locust users (default 16)")
    g.add_argument("--duration", type=int, default=60, help="seconds of load (default 60)")
    g.add_argument("--kill-worker-at", type=float, default=20.0,
                   help="SIGKILL one worker this many seconds in (default 20; 0: none)")
    g.add_argument("--heartbeat-interval", type=float, default=2.0, help="the workers' heartbeat interval (default 2)")
    g.add_argument("--heartbeat-expiry", type=float, default=8.0,
                   help="the controller's heartbeat expiry: the dead worker must be dropped within it (default 8)")
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_structured(args: argparse.Namespace) -> int:
    from quantchat.benchmark.structured import run_bench_structured

    packed_gguf_default(args)  # the default Q4_1 model keeps its packed int4 weights, as chat and serve do
    return run_bench_structured(args, status)


def register_structured(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("structured", help="decode tokens/s with a JSON Schema constraint vs without; compile time")
    p.add_argument("--model", "-m", default=None, help="model (default: embedded)")
    p.add_argument("--quant", default=None, help="load-time quantization (default: as chat and serve load it)")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--clients", type=int_list, default=[1, 8], help="concurrent sequences (default 1,8)")
    p.add_argument("--tokens", type=int, default=96, help="tokens decoded per sequence (default 96)")
    p.add_argument("--rounds", type=int, default=3, help="rounds each, free and constrained alternating (default 3)")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--out", default=None, help="output folder (default ./quantchat-results/bench-structured-<time>/)")
    p.set_defaults(func=cmd_bench_structured)
