"""``quantchat bench``: decode latency, time to first token, load time and memory per quantization variant.

``quantchat bench [options]`` runs the speed/memory benchmark (quantchat.benchmark.runner). Further
benchmarks become subcommands of ``bench`` (``quantchat bench serve ...``): a module listed in
BENCH_SUBCOMMAND_MODULES provides ``register_bench(bench_subparsers)``; with no subcommand named,
``quantchat bench`` runs the speed/memory benchmark.
"""

from __future__ import annotations

import argparse
import importlib

from quantchat.cli.common import status
from quantchat.errors import QuantchatError

# modules adding subcommands to `quantchat bench` (e.g. a future "quantchat.cli.bench_serve_cmds" for `bench serve`)
BENCH_SUBCOMMAND_MODULES: list[str] = ["quantchat.serving.bench_serve"]


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from quantchat.benchmark.runner import BenchOptions, print_rich, run_bench

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
    from quantchat.benchmark.runner import DEFAULT_PROMPT_LENGTHS, DEFAULT_QUANTS
    from quantchat.benchmark.synthetic import SYNTHETIC_CONFIGS

    p.add_argument("--model", "-m", default=None,
                   help="HF folder, .gguf file or quantized folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quant", default=DEFAULT_QUANTS,
                   help="comma-separated variants: none, int8, int4-sym, int4-asym, awq, gptq; METHOD:GROUP sets a "
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
    p.add_argument("--peer", choices=["llama.cpp"], default=None,
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
    if BENCH_SUBCOMMAND_MODULES:
        bench_sub = p.add_subparsers(dest="bench_command", required=False, metavar="SUBCOMMAND")
        for name in BENCH_SUBCOMMAND_MODULES:
            importlib.import_module(name).register_bench(bench_sub)
