"""``quantchat quantize``: quantize a model and save a quantized checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantchat.cli.common import status
from quantchat.errors import QuantchatError


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


def register(sub: argparse._SubParsersAction) -> None:
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
