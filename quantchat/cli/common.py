"""Shared pieces of the command line: model and sampling options, loading, status output."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from quantchat.errors import QuantchatError
from quantchat.quant import methods


def add_model_args(p: argparse.ArgumentParser, max_seq_len: int = 4096) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None,
                   help="Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_kv_cache_arg(g)
    g.add_argument("--max-seq-len", type=int, default=max_seq_len,
                   help=f"KV cache length in tokens, capped by the model's context (default: {max_seq_len})")
    g.add_argument("--quant", default=None, choices=[methods.NONE, *methods.load_time_names()],
                   help="quantize in memory at load time (round-to-nearest); weights stay packed")
    g.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64, 128 (default 128)")
    g.add_argument("--compile", action="store_true",
                   help="decode through torch.compile instead of the fused C++ step (which is faster on CPU; "
                        "for CUDA, or models the fused step does not cover)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--checkpoint-key-file", default=None,
                   help="key of an encrypted quantized checkpoint (sets $QUANTCHAT_CHECKPOINT_KEY_FILE)")
    g.add_argument("--checkpoint-sign-key-file", default=None,
                   help="HMAC key its manifest must be signed with; unsigned ones are refused "
                        "(sets $QUANTCHAT_CHECKPOINT_SIGN_KEY_FILE)")


def add_kv_cache_arg(g) -> None:
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="KV cache element type (default auto: float16 for a float32 model on CPU, as llama.cpp: "
                        "half the memory and faster batched decode at long contexts; else the model's dtype; "
                        "float32: exact float32)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", "-t", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="0 = off (default: 40)")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style, 1.0 = off")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="OpenAI's: subtracted once from every token already generated (-2..2, default 0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="OpenAI's: subtracted per occurrence in the generated tokens (-2..2, default 0)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-new-tokens", "-n", type=int, default=512)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--no-stats", action="store_true", help="do not print the timing line")


def add_structured_args(p: argparse.ArgumentParser) -> None:
    """Structured output (docs/structured_output.md): at most one constraint on the answer."""
    g = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="answer with a JSON object")
    g.add_argument("--json-schema", metavar="FILE", help="answer with JSON valid under this JSON Schema file")
    g.add_argument("--grammar", metavar="FILE", help="answer in this grammar (a Lark or GBNF file)")
    g.add_argument("--regex", metavar="PATTERN", help="answer with text this regular expression matches")


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QuantchatError(f"{path}: cannot read the {what} ({e})") from None


def constraint_from_args(args: argparse.Namespace):
    """The constraint ``add_structured_args`` asked for (None: free text)."""
    from quantchat.sampling.constraints import Constraint

    if getattr(args, "json", False):
        return Constraint("json_object")
    if getattr(args, "json_schema", None):
        text = _read_text(args.json_schema, "JSON schema")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise QuantchatError(f"{args.json_schema}: not valid JSON ({e})") from None
        return Constraint.json_schema(schema)
    if getattr(args, "grammar", None):
        return Constraint("grammar", _read_text(args.grammar, "grammar"))
    if getattr(args, "regex", None):
        return Constraint("regex", args.regex)
    return None


def sampling_from_args(args: argparse.Namespace):
    from quantchat.sampling.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, max_new_tokens=args.max_new_tokens,
        stop=list(args.stop), constraint=constraint_from_args(args),
    )


def status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def packed_gguf_default(args: argparse.Namespace) -> None:
    """Without ``--quant``, a Q4_1 GGUF model (the embedded default is one) keeps its weights packed: Q4_1
    is int4-asym with groups of 32, so that is the same weights at a quarter of float32's memory and
    several times the decode speed. ``--quant none`` still asks for float32."""
    if args.quant is not None or args.group_size is not None:
        return
    from quantchat.loading.gguf_io import gguf_main_type, gguf_types
    from quantchat.paths import default_model_path

    path = default_model_path() if args.model is None else Path(args.model).expanduser()
    if path is None or path.suffix.lower() != ".gguf" or not path.is_file():
        return
    try:
        main = gguf_main_type(gguf_types(path))
    except Exception:  # noqa: BLE001 - unreadable here: loading reports it properly
        return
    if main == "Q4_1":
        args.quant, args.group_size = "int4-asym", 32
        status("the GGUF's Q4_1 weights stay packed as int4-asym g32 (the same weights; --quant none for float32)")


def load_from_args(args: argparse.Namespace):
    from quantchat.engine.build import load_engine

    if args.threads is not None:
        if args.threads < 1:
            raise QuantchatError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise QuantchatError("--max-seq-len must be at least 2")
    loaded = load_engine(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                         progress=status, compile=args.compile,
                         quant=args.quant, group_size=args.group_size, kv_cache_dtype=args.kv_cache_dtype)
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


def apply_checkpoint_key_args(args) -> None:
    """--checkpoint-key-file / --checkpoint-sign-key-file become the variables the checkpoint loader reads
    (this process and the workers it starts)."""
    for flag, var in (("checkpoint_key_file", "QUANTCHAT_CHECKPOINT_KEY_FILE"),
                      ("checkpoint_sign_key_file", "QUANTCHAT_CHECKPOINT_SIGN_KEY_FILE")):
        path = getattr(args, flag, None)
        if path:
            if not Path(path).is_file():
                raise QuantchatError(f"--{flag.replace('_', '-')} {path}: no such file")
            os.environ[var] = str(Path(path).absolute())
