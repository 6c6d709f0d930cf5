"""The ``quantchat`` command: chat, complete, models, and the commands of COMMAND_MODULES.

Errors the user can fix (bad path, corrupt file, prompt too long...) print one line and exit 2;
Ctrl-C exits 130. Generated text goes to stdout, status and timings to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from quantchat.cli.common import (add_model_args, add_sampling_args, add_structured_args,
                                  apply_checkpoint_key_args, load_from_args, packed_gguf_default,
                                  sampling_from_args, status, stream_out)
from quantchat.errors import QuantchatError

# commands defined in their own modules, each with register(subparsers)
COMMAND_MODULES = ["quantchat.cli.quant_cmds", "quantchat.cli.serve_cmds", "quantchat.cli.eval_cmds", "quantchat.cli.bench_cmds", "quantchat.cli.cluster_cmds", "quantchat.cli.deploy_cmds"]


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
    packed_gguf_default(args)
    loaded = load_from_args(args)
    tok = loaded.engine.tokenizer
    if template is None and tok.chat_template is None:
        guess = tok.guessed_template()
        status(f"note: {loaded.source.name} has no chat template of its own (a base model?): using the built-in "
               f"'{guess}' guessed from its vocabulary, which it may not follow; --template picks another, and "
               "`quantchat complete` continues plain text")
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
    packed_gguf_default(args)
    loaded = load_from_args(args)
    ids = loaded.engine.tokenizer.encode(prompt)
    loaded.engine.check_prompt(ids)
    if not args.no_echo:
        sys.stdout.write(prompt)
    stream_out(loaded.engine.generate(ids, params), not args.no_stats)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from quantchat.loading.resolve import describe_model_dir
    from quantchat.model.families import FAMILIES
    from quantchat.paths import DEFAULT_MODEL_NAME, installed_known_models, known_model_path, quantchat_home

    rows = []
    listed: set[str] = set()
    for m in installed_known_models():  # by short name (--model NAME); a chunked GGUF may not be assembled yet
        path = known_model_path(m.name, assemble=False)
        row = {"name": m.name + (" (default)" if m.name == DEFAULT_MODEL_NAME else ""), "path": str(path),
               "architecture": "?", "quantization": "gguf", "size_bytes": 0}
        if path.is_file():
            row["size_bytes"] = path.stat().st_size
            try:
                from quantchat.loading.gguf_io import cached_conversion, gguf_summary

                arch, types = gguf_summary(path)
                row["architecture"] = arch
                row["quantization"] = "gguf " + "/".join(sorted(types))
                row["family"] = next((f.name for f in FAMILIES.values() if f.gguf_architecture == arch), "?")
                conv = cached_conversion(path)
                if conv is not None:
                    row["decode"] = describe_model_dir(conv)["decode"]
            except QuantchatError:
                pass
        else:
            row["path"] += " (assembled on first use)"
        rows.append(row)
        listed.add(str(path))
    home = quantchat_home()
    for base in [home / "models", home / "converted", *[Path(p) for p in args.dir]]:
        if not base.is_dir():
            continue
        for d in sorted(base.iterdir()):
            if (d / "config.json").is_file():
                info = describe_model_dir(d)
                info["name"] = d.name
                rows.append(info)
            elif d.suffix == ".gguf" and d.is_file() and str(d) not in listed:
                rows.append({"name": d.stem, "path": str(d), "architecture": "?", "quantization": "gguf",
                             "size_bytes": d.stat().st_size})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models (home: {home})")
    for col in ("name", "family", "quantization", "size", "decode", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], str(r.get("family", "?")), str(r["quantization"]),
                      f"{r['size_bytes'] / 1e6:.0f} MB", str(r.get("decode", "?")), r["path"])
    Console().print(table)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Do a model's one-time work now (the GGUF conversion, the CPU kernel build for this CPU), so that
    its first chat starts as fast as later ones. The setup script runs it for the default model."""
    import time

    from quantchat.loading.resolve import resolve_model

    t0 = time.perf_counter()
    source = resolve_model(args.model, progress=status)
    status(f"model: {source.name} ready in {source.hf_dir} ({time.perf_counter() - t0:.1f} s)")
    if args.device != "cpu":
        import torch

        if torch.cuda.is_available() and args.device in ("auto", "cuda"):
            return 0
    from quantchat.kernels import cpu as cpu_kernels

    t1 = time.perf_counter()
    if args.all_kernel_variants:  # an image's build stage: compile every variant, load what this CPU runs
        try:
            built = cpu_kernels.build_variants()
        except cpu_kernels.KernelsUnavailable as e:
            raise QuantchatError(f"cannot build the CPU kernels: {e}") from None
        status(f"CPU kernels built in {cpu_kernels.kernels_dir()}: "
               + ", ".join(f"{n} ({s:.1f} s)" for n, s in built.items()))
    if not cpu_kernels.is_built():
        status("building quantchat's CPU kernels for this CPU (once, about 15 s)...")
    if cpu_kernels.available():
        status(f"CPU kernels: {cpu_kernels.loaded_variant().name} ready ({time.perf_counter() - t1:.1f} s)")
    else:
        status(f"CPU kernels unavailable ({cpu_kernels.unavailable_reason()}); torch's kernels will be used")
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
    add_structured_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("complete", help="plain text completion, no chat template")
    add_model_args(p)
    add_sampling_args(p, temperature=0.0)
    p.add_argument("--prompt", "-p", required=True, help="text to continue ('-' reads stdin)")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation")
    add_structured_args(p)
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("models", help="list the models quantchat can see")
    p.add_argument("--dir", action="append", default=[], help="also list models in this folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("prepare", help="do a model's one-time work now (GGUF conversion, CPU kernel build)")
    p.add_argument("--model", "-m", default=None,
                   help="Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto: the CPU kernels are built unless CUDA runs it")
    p.add_argument("--all-kernel-variants", action="store_true",
                   help="compile the CPU kernels for every variant (AVX2, AVX-512 VNNI, AMX), not only this CPU's: "
                        "for an image that runs where no compiler is")
    p.set_defaults(func=cmd_prepare)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdin, sys.stdout):  # undecodable input must not crash the chat
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        apply_checkpoint_key_args(args)
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
