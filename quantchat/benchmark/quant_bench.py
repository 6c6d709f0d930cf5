"""Quantization quality and speed on one model, side by side in one run.

For each variant (float32, int8, int4-sym / int4-asym at group 32 and 128, awq, gptq): perplexity on
the built-in corpus (windows of 512, non-overlapping), decode tokens/s (greedy, EOS ignored, median
of runs, timed from the 2nd to the last token), resident weight bytes, resident bytes per parameter
of the transformer blocks' linear layers (every tensor each module holds: packed codes, scales, mins,
bias; int4 pays 0.5 + 4 / group size, plus the zero padding of K = 576 to the group), and
quantization time.

    .venv/bin/python -m quantchat.benchmark.quant_bench --threads 2 --ppl-tokens 32768

Quantization speed of the calibrated methods (AWQ, GPTQ; the issue-22 targets): ``--repeats N`` quantizes
each variant N times and records every time and their median (the machine may be shared: medians, and
ratios of variants run side by side, are what to compare); ``--no-decode`` skips the decode timing. A
variant ``awq:128:ref`` runs AWQ's reference search (``awq_model(fast=False)``, every grid point on every
token: minutes per block) beside the default fast one:

    .venv/bin/python -m quantchat.benchmark.quant_bench --variants awq:128,gptq:128 --calib-samples 32 \
        --repeats 3 --no-decode --out quantchat-results/quant-speed.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from quantchat.benchmark.measure import weight_bytes
from quantchat.benchmark.results import RESULTS_DIR, Results
from quantchat.engine.generate import Engine
from quantchat.eval.perplexity import perplexity
from quantchat.loading.hf_loader import load_model
from quantchat.loading.resolve import resolve_model
from quantchat.quant.calibration import builtin_corpus, calibration_batches
from quantchat.quant import methods
from quantchat.quant.quantize import QuantSpec, quantize_model
from quantchat.sampling.sampling import SamplingParams
from quantchat.tokenizer.tokenizer import Tokenizer

DEFAULT_VARIANTS = "float32,int8,int4-sym:32,int4-asym:32,int4-sym:128,int4-asym:128,awq:128,gptq:128"


def model_bytes(model: torch.nn.Module) -> int:
    """Resident weight bytes (packed codes for quantized modules, shared storage once, KV cache excluded)."""
    return weight_bytes(model)


def linear_bytes_per_param(model: torch.nn.Module) -> float:
    """Resident bytes per weight of the blocks' linears (wqkv, wo, w13, w2; not the LM head)."""
    from quantchat.quant.linear import QuantizedLinear, module_tensor_bytes
    from quantchat.quant.quantize import linear_names

    nbytes = params = 0
    for name in linear_names(model):
        m = model.get_submodule(name)
        params += m.in_features * m.out_features
        if isinstance(m, QuantizedLinear):
            nbytes += sum(module_tensor_bytes(m).values())
        else:
            nbytes += sum(t.numel() * t.element_size() for t in m.parameters())
    return nbytes / params


def linear_params(model: torch.nn.Module) -> int:
    cfg = model.config
    per_layer = cfg.dim * cfg.head_dim * (2 * cfg.n_head + 2 * cfg.n_kv_head) + 3 * cfg.dim * cfg.intermediate_size
    return cfg.n_layer * per_layer


def decode_speed(engine: Engine, prompt: list[int], new_tokens: int, runs: int) -> dict:
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    rates = []
    for r in range(runs + 1):
        times = []
        for _ in engine.generate(prompt, params):
            times.append(time.perf_counter())
        if r:  # first run is warm-up
            rates.append((len(times) - 2) / (times[-2] - times[0]))  # last chunk is the final flush
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": rates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1, help="quantize each variant this many times (median kept)")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode-speed runs")
    ap.add_argument("--out", default=str(Path(RESULTS_DIR) / "quant.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = resolve_model(args.model)
    tok = Tokenizer.from_dir(src.hf_dir)
    corpus = tok.encode(builtin_corpus(), add_bos=False)
    # the calibration windows come from the second half of the corpus, perplexity from the first
    ppl_ids = corpus[: args.ppl_tokens]
    calib = calibration_batches(tok, args.calib_samples, args.calib_seq_len,
                                text=tok.decode(corpus[len(corpus) // 2:]))
    prompt = tok.encode("The history of the printing press begins")
    rows = []
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    for v in args.variants.split(","):
        method, _, rest = v.partition(":")
        gs, _, mode = rest.partition(":")
        if mode not in ("", "ref") or (mode and method != "awq"):
            raise SystemExit(f"unknown variant {v!r}: a method, ':group size', and ':ref' for AWQ's reference search")
        opts = {"fast": False} if mode else None
        total_s, quant_s = [], []
        for _ in range(args.repeats if method != "float32" else 1):
            t0 = time.perf_counter()
            model = load_model(src.hf_dir, cpu_layout=method == "float32")
            if method != "float32":
                spec = QuantSpec.for_method(method, int(gs) if gs else None)
                t1 = time.perf_counter()
                with torch.inference_mode():
                    quantize_model(model, spec, calib=calib if method in methods.calibrated_names() else None,
                                   calib_options=opts)
                quant_s.append(time.perf_counter() - t1)
                total_s.append(time.perf_counter() - t0)
        qtime = statistics.median(total_s) if total_s else 0.0
        t1 = time.perf_counter()
        res = perplexity(model, ppl_ids, window=args.window)
        ppl_s = time.perf_counter() - t1
        engine = Engine(model, tok, max_seq_len=1024)
        speed = (decode_speed(engine, prompt, args.new_tokens, args.runs) if not args.no_decode
                 else {"median": None, "min": None, "max": None, "runs": []})
        wbytes = model_bytes(model)
        bpp = linear_bytes_per_param(model)
        row = {"variant": v, "ppl": res.ppl, "tokens_scored": res.tokens_scored, "ppl_s": ppl_s,
               "ppl_tokens_per_s": res.tokens_scored / ppl_s, "decode_tok_s": speed,
               "weight_bytes": wbytes, "linear_bytes_per_param": bpp, "quantize_s": qtime,
               "quantize_runs_s": total_s, "quantize_model_s": statistics.median(quant_s) if quant_s else 0.0,
               "quantize_model_runs_s": quant_s, "threads": torch.get_num_threads()}
        rows.append(row)
        runs = f", runs {', '.join(f'{t:.0f}' for t in total_s)} s" if len(total_s) > 1 else ""
        dec = f"{speed['median']:.1f} tok/s" if speed["runs"] else "not timed"
        print(f"{v:>14}: ppl {res.ppl:.3f}  decode {dec}  weights {wbytes / 1e6:.1f} MB  "
              f"linears {bpp:.3f} B/param  (quantize {qtime:.0f} s incl. loading{runs}; "
              f"ppl pass {res.tokens_scored / ppl_s:.0f} tok/s)", flush=True)
        del engine, model
    base = rows[0]["ppl"] if rows and rows[0]["variant"] == "float32" else None
    lines = ["| variant | perplexity | vs float32 | decode tok/s (median [min-max]) | weights MB | linears B/param "
             "| quantize s (median) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["decode_tok_s"]
        rel = f"{(r['ppl'] / base - 1) * 100:+.2f}%" if base else "-"
        dec = f"{d['median']:.1f} [{d['min']:.1f}-{d['max']:.1f}]" if d["runs"] else "-"
        lines.append(f"| {r['variant']} | {r['ppl']:.3f} | {rel} | {dec} "
                     f"| {r['weight_bytes'] / 1e6:.1f} | {r['linear_bytes_per_param']:.3f} | {r['quantize_s']:.1f} |")
    table = "\n".join(lines)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Results("quant-bench", fields={"args": vars(args), "model": src.name, "torch": torch.__version__,
                                   "results": rows, "table": table}).write(out)
    out.with_suffix(".md").write_text(table + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
