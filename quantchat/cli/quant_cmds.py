"""Quantization commands: ``quantize`` (with ``--report``), ``inspect`` (per-layer error of a quantized
folder against its float model) and ``export-gguf`` (a llama.cpp GGUF file)."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantchat.cli.common import status
from quantchat.errors import QuantchatError
from quantchat.paths import KNOWN_MODELS
from quantchat.quant import methods


def cmd_quantize(args: argparse.Namespace) -> int:
    import time

    import torch

    from quantchat.loading.hf_loader import load_model
    from quantchat.loading.resolve import resolve_model
    from quantchat.quant.checkpoint import is_quantized_dir, save_quantized
    from quantchat.quant.quantize import NEEDS_CALIBRATION, QuantSpec, quantize_model, stage_progress
    from quantchat.quant.sealing import CheckpointKeys
    from quantchat.tokenizer.tokenizer import Tokenizer

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    spec = QuantSpec.for_method(args.method, args.group_size, None if args.sym is None else args.sym == "sym")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise QuantchatError(f"{out}: already exists (use --force to replace it)")
    if args.report is not None:
        _check_report_args(args.report_samples, args.report_seq_len)
    source = resolve_model(args.model, progress=status)
    if is_quantized_dir(source.hf_dir):
        raise QuantchatError(f"{source.hf_dir}: already quantized; quantize the original model")
    t0 = time.perf_counter()
    model = load_model(source.hf_dir, device="cpu", dtype=torch.float32, cpu_layout=False)
    calib = None
    text = None
    if args.calib and (spec.method in NEEDS_CALIBRATION or args.report is not None):
        try:
            text = Path(args.calib).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise QuantchatError(f"{args.calib}: cannot read calibration text ({e})") from None
    if spec.method in NEEDS_CALIBRATION:
        from quantchat.quant.calibration import calibration_batches

        calib = calibration_batches(Tokenizer.from_dir(source.hf_dir), n_samples=args.calib_samples,
                                    seq_len=args.calib_seq_len, text=text)
        status(f"calibration: {calib.shape[0]} samples x {calib.shape[1]} tokens")
    report_dir = None
    if args.report is not None:
        report_dir = Path(args.report) if args.report else out / "report"
    with torch.inference_mode():
        codes = quantize_model(model, spec, calib=calib, progress=stage_progress(), keep_codes=report_dir is not None)
    keys = CheckpointKeys.from_files(args.encrypt_key_file, args.sign_key_file)
    if keys.encrypt or keys.sign:
        status("the checkpoint: " + ", ".join(w for w, k in (("shards encrypted (AES-256-GCM)", keys.encrypt),
                                                            ("manifest signed (HMAC-SHA256)", keys.sign)) if k))
    save_quantized(out, model, spec, codes, source.hf_dir, max_shard_bytes=int(args.shard_size_mb * 1024**2),
                   source={"origin": str(Path(source.origin).absolute()), "hf_dir": str(Path(source.hf_dir).absolute())},
                   keys=keys)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    status(f"quantized {source.name} with {spec.method}"
           f"{f' g{spec.group_size}' if spec.group_size else ''} in {time.perf_counter() - t0:.1f} s: "
           f"{out} ({size / 1e6:.1f} MB of weights)")
    if report_dir is not None:
        ref = load_model(source.hf_dir, device="cpu", dtype=torch.float32, cpu_layout=False)
        _report(ref, model, Tokenizer.from_dir(source.hf_dir), source.name, spec.method, spec.to_dict(),
                report_dir, layer=None, samples=args.report_samples, seq_len=args.report_seq_len, text=text)
    return 0


def _check_report_args(samples: int, seq_len: int) -> None:
    if samples < 1 or seq_len < 2:
        raise QuantchatError(f"the report needs at least 1 calibration window of 2 tokens (got {samples} x {seq_len})")


def _report(ref, qmodel, tokenizer, name: str, method: str, spec: dict, out_dir: Path, layer: str | None,
            samples: int, seq_len: int, text: str | None) -> None:
    """Measure, print the table, write JSON / markdown / PNGs."""
    import time

    import torch

    from quantchat.quant import report as qr

    t0 = time.perf_counter()
    calib = qr.report_calibration(tokenizer, samples, seq_len, text)
    status(f"measuring the quantization error on {calib.shape[0]} x {calib.shape[1]} calibration tokens...")
    with torch.inference_mode():
        rep = qr.build_report(ref, qmodel, calib, model_name=name, method=method, spec=spec)
    paths = qr.write_report(rep, out_dir, ref, qmodel, layer)
    qr.print_table(rep)
    status(f"report in {time.perf_counter() - t0:.1f} s: {paths['json']}, {paths['markdown'].name}, "
           f"{paths['histogram'].name} ({qr.resolve_layer(rep, layer)}), {paths['profile'].name}")


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.cpu:
        from quantchat.cli.inspect_cmds import cmd_inspect_cpu

        return cmd_inspect_cpu(args)
    if args.quantized is None:
        raise QuantchatError("inspect needs a QUANTIZED_DIR (the per-layer error report) or --cpu")
    import torch

    from quantchat.loading.hf_loader import load_model
    from quantchat.loading.resolve import resolve_model
    from quantchat.quant.checkpoint import is_quantized_dir, load_quantized, read_quant_config
    from quantchat.tokenizer.tokenizer import Tokenizer

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    qdir = Path(args.quantized).expanduser()
    if not qdir.is_dir():
        raise QuantchatError(f"{qdir}: no such folder")
    if not is_quantized_dir(qdir):
        raise QuantchatError(f"{qdir}: not a quantchat quantized folder (no quantchat_quant.json)")
    _check_report_args(args.samples, args.seq_len)
    q = read_quant_config(qdir)
    reference = args.reference or recorded_source(q)
    if reference is None:
        raise QuantchatError(f"{qdir} does not record the float model it was quantized from; "
                             "give it with --reference MODEL (HF folder or .gguf)")
    if not args.reference and not Path(reference).expanduser().exists():
        raise QuantchatError(f"{qdir} was quantized from {reference}, which is no longer there; "
                             "give the float model with --reference MODEL")
    source = resolve_model(str(reference), progress=status)
    if is_quantized_dir(source.hf_dir):
        raise QuantchatError(f"{source.hf_dir}: the reference must be the float model, not a quantized one")
    text = None
    if args.calib:
        try:
            text = Path(args.calib).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise QuantchatError(f"{args.calib}: cannot read calibration text ({e})") from None
    qmodel = load_quantized(qdir, device="cpu", dtype=torch.float32, keep_codes=True)
    ref = load_model(source.hf_dir, device="cpu", dtype=torch.float32, cpu_layout=False)
    from quantchat.quant.report import check_compatible, layer_names, match_layer

    check_compatible(ref, qmodel)
    if args.layer is not None:
        match_layer(layer_names(qmodel), args.layer)  # a bad name fails before the measurement
    spec = {k: q.get(k) for k in ("method", "bits", "group_size", "symmetric", "head_bits") if k in q}
    out = Path(args.out) if args.out else qdir / "report"
    _report(ref, qmodel, Tokenizer.from_dir(source.hf_dir), qdir.name, q["method"], spec, out, args.layer,
            args.samples, args.seq_len, text)
    return 0


def recorded_source(quant_config: dict) -> str | None:
    """The float model a quantized folder records as its source (quantchat_quant.json "source": a path, or a
    dict with "origin" / "model" / "path" / "hf_dir"); an existing path is preferred."""
    s = quant_config.get("source")
    cands = [s.get(k) for k in ("origin", "model", "path", "gguf", "hf_dir")] if isinstance(s, dict) else [s]
    cands = [c for c in cands if isinstance(c, str) and c]
    return next((c for c in cands if Path(c).expanduser().exists()), cands[0] if cands else None)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    import time

    import torch

    from quantchat.quant.gguf_export import export_gguf

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    if args.model is not None and not Path(args.model).expanduser().exists() and args.model not in KNOWN_MODELS:
        raise QuantchatError(f"{args.model}: no such file or folder")
    t0 = time.perf_counter()
    res = export_gguf(args.model, args.out, args.type, force=args.force, name=args.name,
                      tokenizer_pre=args.tokenizer_pre, progress=status)
    for w in res.warnings:
        status(f"warning: {w}")
    counts: dict[str, int] = {}
    for t in res.tensor_types.values():
        counts[t] = counts.get(t, 0) + 1
    mix = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    status(f"wrote {res.path} ({res.size_bytes / 1e6:.1f} MB, {res.n_tensors} tensors: {mix}; from the "
           f"{res.source} model, tokenizer from {res.tokenizer_from}) in {time.perf_counter() - t0:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save a quantized checkpoint")
    p.add_argument("model", nargs="?", default=None, help="HF folder or .gguf (default: the embedded model)")
    p.add_argument("--method", required=True, choices=list(methods.names()))
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64, 128 (default 128)")
    p.add_argument("--sym", choices=["sym", "asym"], default=None, help="awq/gptq grid (default asym)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--calib", default=None, help="calibration text file (default: built-in corpus)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--shard-size-mb", type=float, default=2048, help="max size of one safetensors shard")
    p.add_argument("--encrypt-key-file", default=None,
                   help="encrypt the shards at rest with this 256-bit key (AES-256-GCM; also "
                        "$QUANTCHAT_CHECKPOINT_KEY[_FILE]); quantchat deploy checkpoint-key makes one")
    p.add_argument("--sign-key-file", default=None,
                   help="sign the manifest with this key (HMAC-SHA256; also $QUANTCHAT_CHECKPOINT_SIGN_KEY[_FILE])")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report", nargs="?", const="", default=None, metavar="DIR",
                   help="after saving, measure the per-layer quantization error and write a report "
                        "(JSON, markdown, PNG charts) to DIR (default: OUT/report)")
    p.add_argument("--report-samples", type=int, default=4, help="report: calibration windows (default 4)")
    p.add_argument("--report-seq-len", type=int, default=128, help="report: tokens per window (default 128)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="per-layer quantization error of a quantized folder against its float model; "
                                       "--cpu: the CPU kernel variant in use and why")
    p.add_argument("quantized", metavar="QUANTIZED_DIR", nargs="?", default=None,
                   help="a folder written by quantchat quantize")
    p.add_argument("--cpu", action="store_true",
                   help="instead: the CPU's features, quantchat's kernel variants, the one in use and why")
    p.add_argument("--json", action="store_true", help="--cpu: print it as JSON")
    p.add_argument("--reference", default=None, metavar="MODEL",
                   help="the float model it was quantized from (HF folder or .gguf; default: the recorded source)")
    p.add_argument("--layer", default=None, metavar="NAME",
                   help="layer for the weight histogram, e.g. layers.3.feed_forward.w2, 3.w2 or output "
                        "(default: the largest output error)")
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default: QUANTIZED_DIR/report)")
    p.add_argument("--samples", type=int, default=4, help="calibration windows (default 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--calib", default=None, help="calibration text file (default: built-in corpus)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export-gguf", help="write a GGUF file llama.cpp can load (q4_0, q4_1 or q8_0)")
    p.add_argument("model", nargs="?", default=None,
                   help="quantized folder, HF folder, .gguf or a known short name (default: the embedded model)")
    p.add_argument("--type", required=True, metavar="TYPE", help="GGUF type of the linears: q4_0, q4_1 or q8_0")
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="output file")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--name", default=None, help="general.name to record (default: the source's)")
    p.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="llama.cpp pre-tokenizer name (default: copied or identified from tokenizer.json)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_export_gguf)
