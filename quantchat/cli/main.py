"""The ``quantchat`` command: chat, complete, models.

Errors the user can fix (bad path, corrupt file, prompt too long...) print one line and exit 2;
Ctrl-C exits 130. Generated text goes to stdout, status and timings to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from quantchat.errors import QuantchatError


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None,
                   help="Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--max-seq-len", type=int, default=4096,
                   help="KV cache length in tokens, capped by the model's context (default: 4096)")
    g.add_argument("--quant", default=None, choices=["none", "int8", "int4-sym", "int4-asym"],
                   help="quantize in memory at load time (round-to-nearest); weights stay packed")
    g.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64, 128 (default 128)")
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile: faster tokens/s after a one-time compile")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", "-t", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="0 = off (default: 40)")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-new-tokens", "-n", type=int, default=512)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--no-stats", action="store_true", help="do not print the timing line")


def sampling_from_args(args: argparse.Namespace):
    from quantchat.sampling.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
        max_new_tokens=args.max_new_tokens, stop=list(args.stop),
    ).validate()


def status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_from_args(args: argparse.Namespace):
    from quantchat.loading.resolve import load_engine

    if args.threads is not None:
        if args.threads < 1:
            raise QuantchatError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise QuantchatError("--max-seq-len must be at least 2")
    loaded = load_engine(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                         progress=status, compile=args.compile,
                         quant=args.quant, group_size=args.group_size)
    e = loaded.engine
    q = f", {args.quant}" if args.quant and args.quant != "none" else ""
    status(f"loaded {loaded.source.name} ({e.model.config.n_params / 1e6:.0f}M params, {args.dtype}{q}, "
           f"{e.device}) in {loaded.load_s:.1f} s; context {e.max_seq_len} tokens")
    return loaded


def stream_out(chunks, show_stats: bool) -> str:
    pieces, stats = [], None
    for chunk in chunks:
        if chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            pieces.append(chunk.text)
        stats = chunk.stats
    sys.stdout.write("\n")
    sys.stdout.flush()
    if show_stats and stats is not None:
        status(stats.summary())
    return "".join(pieces)


CHAT_HELP = "commands: /reset (forget the conversation), /exit (quit), /help"


def cmd_chat(args: argparse.Namespace) -> int:
    from quantchat.engine.generate import ChatSession

    params = sampling_from_args(args)
    template = args.template
    if template is not None and Path(template).is_file():
        try:
            template = Path(template).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise QuantchatError(f"{args.template}: cannot read chat template ({e})") from None
    loaded = load_from_args(args)
    session = ChatSession(loaded.engine, params, system_prompt=args.system, template=template)
    if args.prompt is not None:
        stream_out(session.send(args.prompt), not args.no_stats)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        status(f"chatting with {loaded.source.name}; {CHAT_HELP}")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            status("(conversation cleared)")
            continue
        if text == "/help":
            status(CHAT_HELP)
            continue
        try:
            stream_out(session.send(line), not args.no_stats)
        except QuantchatError as e:
            status(f"error: {e}")
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    loaded = load_from_args(args)
    ids = loaded.engine.tokenizer.encode(prompt)
    loaded.engine.check_prompt(ids)
    if not args.no_echo:
        sys.stdout.write(prompt)
    stream_out(loaded.engine.generate(ids, params), not args.no_stats)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from quantchat.loading.resolve import describe_model_dir
    from quantchat.paths import default_model_path, quantchat_home

    rows = []
    default = default_model_path()
    if default is not None:
        rows.append({"name": default.stem + " (default)", "path": str(default), "architecture": "llama",
                     "quantization": "gguf", "size_bytes": default.stat().st_size})
        try:
            from quantchat.loading.gguf_io import read_gguf

            g = read_gguf(default)
            rows[-1]["architecture"] = g.architecture
            types = sorted({g.tensor_info(n)[0] for n in g.tensor_names})
            rows[-1]["quantization"] = "gguf " + "/".join(types)
        except QuantchatError:
            pass
    home = quantchat_home()
    for base in [home / "models", home / "converted", *[Path(p) for p in args.dir]]:
        if not base.is_dir():
            continue
        for d in sorted(base.iterdir()):
            if (d / "config.json").is_file():
                info = describe_model_dir(d)
                info["name"] = d.name
                rows.append(info)
            elif d.suffix == ".gguf" and d.is_file():
                rows.append({"name": d.stem, "path": str(d), "architecture": "?", "quantization": "gguf",
                             "size_bytes": d.stat().st_size})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models (home: {home})")
    for col in ("name", "architecture", "quantization", "size", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], str(r["architecture"]), str(r["quantization"]),
                      f"{r['size_bytes'] / 1e6:.0f} MB", r["path"])
    Console().print(table)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    import time

    import torch
    from rich.progress import Progress

    from quantchat.loading.hf_loader import load_model
    from quantchat.loading.resolve import resolve_model
    from quantchat.quant.checkpoint import is_quantized_dir, save_quantized
    from quantchat.quant.quantize import NEEDS_CALIBRATION, QuantSpec, quantize_model
    from quantchat.tokenizer.tokenizer import Tokenizer

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    spec = QuantSpec.for_method(args.method, args.group_size, None if args.sym is None else args.sym == "sym")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise QuantchatError(f"{out}: already exists (use --force to replace it)")
    source = resolve_model(args.model, progress=status)
    if is_quantized_dir(source.hf_dir):
        raise QuantchatError(f"{source.hf_dir}: already quantized; quantize the original model")
    t0 = time.perf_counter()
    model = load_model(source.hf_dir, device="cpu", dtype=torch.float32, cpu_layout=False)
    calib = None
    if spec.method in NEEDS_CALIBRATION:
        from quantchat.quant.calibration import calibration_batches

        text = None
        if args.calib:
            try:
                text = Path(args.calib).read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise QuantchatError(f"{args.calib}: cannot read calibration text ({e})") from None
        calib = calibration_batches(Tokenizer.from_dir(source.hf_dir), n_samples=args.calib_samples,
                                    seq_len=args.calib_seq_len, text=text)
        status(f"calibration: {calib.shape[0]} samples x {calib.shape[1]} tokens")
    with Progress(transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        with torch.inference_mode():
            codes = quantize_model(model, spec, calib=calib, progress=progress)
    save_quantized(out, model, spec, codes, source.hf_dir, max_shard_bytes=int(args.shard_size_mb * 1024**2))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    status(f"quantized {source.name} with {spec.method}"
           f"{f' g{spec.group_size}' if spec.group_size else ''} in {time.perf_counter() - t0:.1f} s: "
           f"{out} ({size / 1e6:.1f} MB of weights)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantchat", description="Chat with low-bit quantized LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="terminal chat (or one answer with --prompt)")
    add_model_args(p)
    add_sampling_args(p, temperature=0.7)
    p.add_argument("--prompt", "-p", default=None, help="answer this one message and exit")
    p.add_argument("--system", "-s", default=None, help="system prompt")
    p.add_argument("--template", default=None,
                   help="chat template: a built-in name (chatml, llama-2, vicuna, mistral) or a jinja file")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("complete", help="plain text completion, no chat template")
    add_model_args(p)
    add_sampling_args(p, temperature=0.0)
    p.add_argument("--prompt", "-p", required=True, help="text to continue ('-' reads stdin)")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation")
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("quantize", help="quantize a model and save a quantized checkpoint")
    p.add_argument("model", nargs="?", default=None, help="HF folder or .gguf (default: the embedded model)")
    p.add_argument("--method", required=True, choices=["int8", "int4-sym", "int4-asym", "awq", "gptq"])
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64, 128 (default 128)")
    p.add_argument("--sym", choices=["sym", "asym"], default=None, help="awq/gptq grid (default asym)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--calib", default=None, help="calibration text file (default: built-in corpus)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--shard-size-mb", type=float, default=2048, help="max size of one safetensors shard")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("models", help="list the models quantchat can see")
    p.add_argument("--dir", action="append", default=[], help="also list models in this folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdin, sys.stdout):  # undecodable input must not crash the chat
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        return args.func(args)
    except QuantchatError as e:
        print(f"quantchat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
