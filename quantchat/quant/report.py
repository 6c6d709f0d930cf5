"""Per-layer quantization error: how far each quantized linear is from its float reference.

For every quantized linear (the four of each block and the LM head; the untied int8 embedding too):

* weight rel-MSE ``||W - Wq||^2 / ||W||^2``;
* output rel-MSE ``||W x - Wq x||^2 / ||W x||^2`` over calibration tokens, x being the linear's input
  in the float reference model (captured with forward hooks, block by block, so each linear is
  judged on the same inputs whatever the earlier layers' errors);

plus, for the whole model, the relative MSE of the logits, the top-1 agreement and the mean KL
divergence of the next-token distributions (the quantized model run end to end).

Errors are measured in the reference model's basis. AWQ changes the basis of some linears
(``quant.awq``): it multiplies input columns by s and folds 1/s into the norm before (wqkv, w13 or a
plain MLP's w1, recovered exactly as the ratio of the quantized and reference norm weights) or into
the rows of the linear before (the up rows of w13 for w2; the v rows of wqkv for wo without
grouped-query attention or clip_qkv; a plain MLP's w2 is not scaled). Those row scales are not stored, so for ``awq`` they are estimated per channel by
least squares between the dequantized and the reference rows (0.1-1 % accurate for int4 rows of a
few hundred weights, far below the errors measured). ``Wq`` below is always the dequantized weight
brought back to the reference basis (``effective weight``).

``write_report`` writes ``report.json``, ``report.md`` and two PNG charts (matplotlib, Agg canvas,
no pyplot state): the "quantization loss" histogram of one layer's original vs dequantized weights
(default: the largest output error), and the error profile (error vs layer index per linear kind).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantchat.errors import QuantchatError
from quantchat.quant import rtn
from quantchat.quant.calibration import block_context, chunks, embed, run_block_
from quantchat.quant.embedding import QuantizedEmbedding
from quantchat.quant.linear import QuantizedLinear

KINDS = {"attention.wqkv": "wqkv", "attention.wo": "wo", "feed_forward.w13": "w13", "feed_forward.w1": "w1",
         "feed_forward.w2": "w2"}  # w13: gated MLPs (gate | up), w1: plain MLPs (up -> act -> down)
PROFILE_KINDS = ("wqkv", "wo", "w13", "w1", "w2")
JSON_FILE, MARKDOWN_FILE = "report.json", "report.md"
HISTOGRAM_FILE, PROFILE_FILE = "quant_loss.png", "error_profile.png"
DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, DEFAULT_SEED = 4, 128, 1234

Progress = Callable[[str], None] | None


@dataclass
class LayerError:
    name: str
    kind: str  # wqkv, wo, w13, w2, output, embedding
    layer: int | None  # block index (None for the head / embedding)
    shape: tuple[int, int]  # [out, in]
    method: str  # e.g. "awq int4 g128 asym", "int8"
    weight_rel_mse: float
    output_rel_mse: float
    weight_max_abs_err: float


@dataclass
class QuantReport:
    model: str
    method: str
    spec: dict[str, Any]
    calibration: dict[str, Any]
    layers: list[LayerError]
    logits: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def layer(self, name: str) -> LayerError:
        for e in self.layers:
            if e.name == name:
                return e
        raise KeyError(name)

    def worst(self) -> LayerError:
        """The layer with the largest output error."""
        return max(self.layers, key=lambda e: e.output_rel_mse if math.isfinite(e.output_rel_mse) else -1.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [dict(asdict(e), shape=list(e.shape)) for e in self.layers]
        d["worst_layer"] = self.worst().name if self.layers else None
        block = [e for e in self.layers if e.layer is not None]
        d["mean_block_weight_rel_mse"] = float(np.mean([e.weight_rel_mse for e in block])) if block else None
        d["mean_block_output_rel_mse"] = float(np.mean([e.output_rel_mse for e in block])) if block else None
        return d


# -- weights in the reference basis -------------------------------------------------------------

def dequantized(module: nn.Module) -> Tensor:
    """Float32 [out, in] weight of a quantized linear or int8 embedding (CPU)."""
    if isinstance(module, QuantizedEmbedding):
        return rtn.dequantize_int8(module.weight_int8.cpu(), module.scales.float().cpu())
    try:
        return module.dequantized_weight().float().cpu()
    except RuntimeError as e:
        raise QuantchatError(f"cannot dequantize {type(module).__name__}: {e}") from None


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den elementwise (float32, CPU), 1 where den is 0."""
    num, den = num.detach().float().cpu(), den.detach().float().cpu()
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(den))


def _row_fit(rows_q: Tensor, rows_ref: Tensor) -> Tensor:
    """Per-row least-squares factor g with rows_q ~ g * rows_ref (1 for all-zero reference rows)."""
    num = (rows_q.double() * rows_ref.double()).sum(1)
    den = rows_ref.double().pow(2).sum(1)
    g = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(den))
    return torch.where(g.abs() > 1e-6, g, torch.ones_like(g)).float()


def _bias(module: nn.Module) -> Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().float().cpu().clone()


def block_effective_weights(
    ref_layer: nn.Module, q_layer: nn.Module, awq: bool,
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """{"attention.wqkv": (W_eff, bias_eff), ...}: the block's dequantized weights in the reference basis
    (its ``config.block_linears``: ``feed_forward.w1`` for a plain MLP, ``feed_forward.w13`` for a gated one)."""
    from quantchat.quant.awq import folds_v_into_wo

    cfg = ref_layer.config
    names = cfg.block_linears
    mlp_in = names[2]
    att_r = ref_layer.attention
    for name in names:
        m = q_layer.get_submodule(name)
        if not isinstance(m, QuantizedLinear):
            raise QuantchatError(f"{name} of the quantized model is not quantized ({type(m).__name__})")
    # the norm before each input linear (one shared norm in Falcon-7B-style parallel blocks)
    mlp_norm = "ffn_norm" if hasattr(ref_layer, "ffn_norm") else "attention_norm"
    c_qkv = _ratio(q_layer.attention_norm.weight, ref_layer.attention_norm.weight)
    c_mlp = _ratio(q_layer.get_submodule(mlp_norm).weight, ref_layer.get_submodule(mlp_norm).weight)
    eff = {name: (dequantized(q_layer.get_submodule(name)), _bias(q_layer.get_submodule(name))) for name in names}
    eff["attention.wqkv"][0].mul_(c_qkv[None])
    eff[mlp_in][0].mul_(c_mlp[None])
    if awq:
        wqkv, bqkv = eff["attention.wqkv"]
        if cfg.mlp_gated:  # the w2 scales live in the up rows of w13 (a plain MLP's w2 is not scaled)
            w13, b13 = eff["feed_forward.w13"]
            hidden = ref_layer.feed_forward.hidden
            up = slice(hidden, 2 * hidden)
            g = _row_fit(w13[up], ref_layer.feed_forward.w13.weight.detach().float().cpu()[up])
            w13[up] /= g[:, None]
            if b13 is not None:
                b13[up] /= g
            eff["feed_forward.w2"][0].mul_(g[None])
        if folds_v_into_wo(att_r):
            v = slice(att_r.q_size + att_r.kv_size, att_r.q_size + 2 * att_r.kv_size)
            g = _row_fit(wqkv[v], att_r.wqkv.weight.detach().float().cpu()[v])
            wqkv[v] /= g[:, None]
            if bqkv is not None:
                bqkv[v] /= g
            eff["attention.wo"][0].mul_(g[None])
    return eff


def effective_weight(ref: nn.Module, qmodel: nn.Module, name: str, method: str) -> tuple[Tensor, Tensor]:
    """(reference weight, dequantized weight in the reference basis) of one module, float32 CPU."""
    if name == "output":
        c = _ratio(qmodel.norm.weight, ref.norm.weight)
        return ref.output.weight.detach().float().cpu(), dequantized(qmodel.output) * c[None]
    if name == "tok_embeddings":
        return ref.tok_embeddings.weight.detach().float().cpu(), dequantized(qmodel.tok_embeddings)
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "layers" or ".".join(parts[2:]) not in ref.config.block_linears:
        raise QuantchatError(f"unknown layer '{name}'")
    i = int(parts[1])
    eff = block_effective_weights(ref.layers[i], qmodel.layers[i], method == "awq")
    return ref.get_submodule(name).weight.detach().float().cpu(), eff[".".join(parts[2:])][0]


# -- measuring ----------------------------------------------------------------------------------

def _weight_stats(w: Tensor, wq: Tensor) -> tuple[float, float]:
    d = (wq.double() - w.double())
    ref = float(w.double().pow(2).sum())
    return (float(d.pow(2).sum()) / ref if ref > 0 else float("nan")), float(d.abs().max())


def _method_label(module: nn.Module, method: str) -> str:
    if isinstance(module, QuantizedEmbedding) or getattr(module, "bits", 8) == 8:
        return "int8"
    fmt = f"int4 g{module.group_size} {'sym' if module.symmetric else 'asym'}"
    return fmt if method in ("int4-sym", "int4-asym") else f"{method} {fmt}"


class _Accumulator:
    def __init__(self) -> None:
        self.err, self.ref = 0.0, 0.0

    def add(self, y: Tensor, yq: Tensor) -> None:
        self.err += float((yq - y).pow(2).sum(dtype=torch.float64))
        self.ref += float(y.pow(2).sum(dtype=torch.float64))

    @property
    def rel(self) -> float:
        return self.err / self.ref if self.ref > 0 else float("nan")


def check_compatible(ref: nn.Module, qmodel: nn.Module) -> None:
    """Both models have the same shapes (else a QuantchatError naming the first difference)."""
    a, b = ref.config, qmodel.config
    for f in ("vocab_size", "dim", "n_layer", "n_head", "n_kv_head", "head_dim", "intermediate_size"):
        if getattr(a, f) != getattr(b, f):
            raise QuantchatError(f"the reference model does not match the quantized one: {f} {getattr(a, f)} "
                                 f"vs {getattr(b, f)} (give the float model it was quantized from)")


@torch.no_grad()
def measure(
    ref: nn.Module, qmodel: nn.Module, calib: Tensor, method: str, *, batch_size: int = 4,
    logits: bool = True, progress: Progress = None,
) -> tuple[list[LayerError], dict[str, float]]:
    """Per-layer errors (see module doc) on calibration tokens ``calib`` [n, T], and logit-level errors."""
    check_compatible(ref, qmodel)
    calib = calib.cpu()
    awq = method == "awq"
    n, T = calib.shape
    ctx = block_context(ref, T)
    x = embed(ref, calib).float()
    rows: list[LayerError] = []
    for li, (lr, lq) in enumerate(zip(ref.layers, qmodel.layers)):
        eff = block_effective_weights(lr, lq, awq)
        acc = {k: _Accumulator() for k in eff}

        def hook(key: str):
            w, b = eff[key]

            def fn(_m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
                acc[key].add(out.float(), F.linear(inp[0].float(), w, b))
            return fn

        handles = [lr.get_submodule(k).register_forward_hook(hook(k)) for k in eff]
        try:
            run_block_(lr, x, ctx, batch_size)
        finally:
            for h in handles:
                h.remove()
        for k, (w_eff, _) in eff.items():
            w = lr.get_submodule(k).weight.detach().float().cpu()
            wrel, wmax = _weight_stats(w, w_eff)
            qm = lq.get_submodule(k)
            rows.append(LayerError(f"layers.{li}.{k}", KINDS[k], li, (qm.out_features, qm.in_features),
                                   _method_label(qm, method), wrel, acc[k].rel, wmax))
        if progress:
            progress(f"measured block {li + 1}/{len(ref.layers)}")
    # LM head on the final normed hidden states
    if isinstance(qmodel.output, QuantizedLinear):
        w, w_eff = effective_weight(ref, qmodel, "output", method)
        acc = _Accumulator()
        for sl in chunks(n, batch_size):
            h = ref.norm(x[sl])
            acc.add(F.linear(h, w), F.linear(h, w_eff))
        wrel, wmax = _weight_stats(w, w_eff)
        rows.append(LayerError("output", "output", None, tuple(w.shape), _method_label(qmodel.output, method),
                               wrel, acc.rel, wmax))
    if not ref.config.tie_word_embeddings and isinstance(qmodel.tok_embeddings, QuantizedEmbedding):
        e, e_q = effective_weight(ref, qmodel, "tok_embeddings", method)
        acc = _Accumulator()
        acc.add(e[calib], e_q[calib])
        wrel, wmax = _weight_stats(e, e_q)
        rows.append(LayerError("tok_embeddings", "embedding", None, tuple(e.shape), "int8", wrel, acc.rel, wmax))
    summary = logit_errors(ref, qmodel, calib) if logits else {}
    return rows, summary


@torch.no_grad()
def logit_errors(ref: nn.Module, qmodel: nn.Module, calib: Tensor) -> dict[str, float]:
    """End to end on ``calib`` [n, T]: logits rel-MSE, top-1 agreement and mean KL(float || quantized)."""
    err = tot = kl = agree = 0.0
    count = 0
    for i in range(calib.shape[0]):
        idx = calib[i:i + 1]
        a = ref(idx.to(ref.device)).float().cpu()[0]
        b = qmodel(idx.to(qmodel.device)).float().cpu()[0]
        err += float((a.double() - b.double()).pow(2).sum())
        tot += float(a.double().pow(2).sum())
        la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
        kl += float((la.exp() * (la - lb)).sum(-1).double().sum())
        agree += float((a.argmax(-1) == b.argmax(-1)).sum())
        count += a.shape[0]
    return {"logits_rel_mse": err / tot if tot else float("nan"), "top1_agreement": agree / max(count, 1),
            "mean_kl": kl / max(count, 1), "tokens": count}


def build_report(
    ref: nn.Module, qmodel: nn.Module, calib: Tensor, *, model_name: str, method: str,
    spec: dict[str, Any] | None = None, progress: Progress = None, logits: bool = True,
) -> QuantReport:
    rows, summary = measure(ref, qmodel, calib, method, progress=progress, logits=logits)
    notes = []
    if method == "awq":
        mlp = "w13" if ref.config.mlp_gated else "w1"
        notes.append(f"awq: wqkv/{mlp} input scales recovered exactly from the norm weights; "
                     + ("the w2 (and, without grouped-query attention, wo) scales folded into w13 up rows "
                        "(v rows) are least-squares estimates" if ref.config.mlp_gated else
                        "w2 is not scaled (plain MLP: clip only); the wo scales folded into the v rows (without "
                        "grouped-query attention) are least-squares estimates"))
    return QuantReport(model_name, method, dict(spec or {"method": method}),
                       {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                        "tokens": int(calib.numel())}, rows, summary, notes)


def layer_names(qmodel: nn.Module) -> list[str]:
    """The names a report has for this quantized model, in order."""
    names = [f"layers.{i}.{k}" for i in range(len(qmodel.layers)) for k in qmodel.config.block_linears]
    names.append("output")
    if not qmodel.config.tie_word_embeddings and isinstance(qmodel.tok_embeddings, QuantizedEmbedding):
        names.append("tok_embeddings")
    return names


def match_layer(names: list[str], name: str) -> str:
    """``name`` among ``names``: exact, or short ("3.w2", "layers.3.w2"); QuantchatError otherwise."""
    if name in names:
        return name
    short = name.removeprefix("layers.")
    hits = [n for n in names if n.startswith("layers.")
            and f"{n.split('.')[1]}.{KINDS.get('.'.join(n.split('.')[2:]))}" == short]
    if len(hits) == 1:
        return hits[0]
    raise QuantchatError(f"no layer '{name}' (names look like {names[0]}, 0.w2, output)")


def resolve_layer(report: QuantReport, name: str | None) -> str:
    """A layer name of the report (see ``match_layer``); None -> the largest output error."""
    if name is None:
        return report.worst().name
    return match_layer([e.name for e in report.layers], name)


# -- output -------------------------------------------------------------------------------------

def _fmt(v: float) -> str:
    return f"{v:.3e}" if math.isfinite(v) else str(v)


def markdown_table(report: QuantReport) -> str:
    lines = [f"# Quantization report: {report.model} ({report.method})", "",
             f"Calibration: {report.calibration['samples']} windows x {report.calibration['seq_len']} tokens.", ""]
    if report.logits:
        lg = report.logits
        lines += [f"Whole model: logits rel-MSE {_fmt(lg['logits_rel_mse'])}, top-1 agreement "
                  f"{lg['top1_agreement'] * 100:.1f} %, mean KL {lg['mean_kl']:.4f} nats.", ""]
    lines += ["| layer | shape | method | weight rel-MSE | output rel-MSE |", "|---|---|---|---:|---:|"]
    for e in report.layers:
        lines.append(f"| {e.name} | {e.shape[0]}x{e.shape[1]} | {e.method} | {_fmt(e.weight_rel_mse)} | "
                     f"{_fmt(e.output_rel_mse)} |")
    for n in report.notes:
        lines += ["", f"Note: {n}."]
    return "\n".join(lines) + "\n"


def print_table(report: QuantReport, console=None) -> None:
    """The per-layer table with rich (stdout by default)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"quantization error: {report.model} ({report.method}, "
                        f"{report.calibration['tokens']} calibration tokens)")
    for col, just in (("layer", "left"), ("shape", "right"), ("method", "left"), ("weight rel-MSE", "right"),
                      ("output rel-MSE", "right")):
        table.add_column(col, justify=just)
    worst = report.worst().name if report.layers else None
    for e in report.layers:
        style = "bold red" if e.name == worst else None
        table.add_row(e.name, f"{e.shape[0]}x{e.shape[1]}", e.method, _fmt(e.weight_rel_mse),
                      _fmt(e.output_rel_mse), style=style)
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped: no wrapping at 80 columns
            console.width = max(console.width, 120)
    console.print(table)
    if report.logits:
        lg = report.logits
        console.print(f"whole model: logits rel-MSE {_fmt(lg['logits_rel_mse'])}, top-1 agreement "
                      f"{lg['top1_agreement'] * 100:.1f} %, mean KL {lg['mean_kl']:.4f} nats")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_weight_histogram(w: Tensor, wq: Tensor, path: Path, title: str, bins: int = 200) -> Path:
    """The "quantization loss" chart: histograms of original vs dequantized weights, and of their difference."""
    a, b = w.flatten().double().numpy(), wq.flatten().double().numpy()
    lo, hi = np.quantile(a, [0.0005, 0.9995])
    pad = 0.1 * (hi - lo) or 1e-6
    rng = (float(lo - pad), float(hi + pad))
    fig = _figure(11, 4.2)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    ax1.hist(a, bins=bins, range=rng, histtype="stepfilled", alpha=0.45, color="tab:blue", label="original (float)")
    ax1.hist(b, bins=bins, range=rng, histtype="step", linewidth=1.0, color="tab:red", label="dequantized")
    ax1.set_xlabel("weight value")
    ax1.set_ylabel("count")
    ax1.set_title("weights")
    out = int(((a < rng[0]) | (a > rng[1])).sum())
    ax1.legend(loc="upper right", title=f"{out} outside the range" if out else None, fontsize=8)
    d = b - a
    dl = float(np.quantile(np.abs(d), 0.9999)) or 1e-6
    ax2.hist(d, bins=bins, range=(-1.1 * dl, 1.1 * dl), color="tab:purple")
    ax2.set_xlabel("dequantized - original")
    ax2.set_title("quantization error")
    ax2.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.84, wspace=0.2)
    fig.savefig(path)
    return path


def plot_error_profile(report: QuantReport, path: Path) -> Path:
    """Weight and output rel-MSE vs layer index, one line per linear kind (log scale)."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2)
    n_layers = max((e.layer for e in report.layers if e.layer is not None), default=-1) + 1
    for ax, attr, label in ((axes[0], "weight_rel_mse", "weight rel-MSE"),
                            (axes[1], "output_rel_mse", "output rel-MSE")):
        for kind in PROFILE_KINDS:
            pts = sorted((e.layer, getattr(e, attr)) for e in report.layers if e.kind == kind)
            pts = [(i, v) for i, v in pts if math.isfinite(v) and v > 0]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=kind)
        for e in report.layers:
            v = getattr(e, attr)
            if e.layer is None and math.isfinite(v) and v > 0:  # head after the last block, embedding before
                ax.plot([n_layers if e.kind == "output" else -1], [v], marker="*", markersize=9, linestyle="none",
                        label=f"{e.name} ({e.method})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.set_xlabel("layer index")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.model}: {report.method}, per-layer error", fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.86, wspace=0.25)
    fig.savefig(path)
    return path


def write_report(
    report: QuantReport, out_dir: str | Path, ref: nn.Module, qmodel: nn.Module, layer: str | None = None,
) -> dict[str, Path]:
    """report.json, report.md, the loss histogram of ``layer`` (default: worst output error), the error profile."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantchatError(f"{out}: cannot create the report folder ({e})") from None
    name = resolve_layer(report, layer)
    w, wq = effective_weight(ref, qmodel, name, report.method)
    e = report.layer(name)
    paths = {
        "histogram": plot_weight_histogram(
            w, wq, out / HISTOGRAM_FILE,
            f"{report.model}: {name} [{e.shape[0]}x{e.shape[1]}] {e.method} - weight rel-MSE "
            f"{_fmt(e.weight_rel_mse)}, output rel-MSE {_fmt(e.output_rel_mse)}"),
        "profile": plot_error_profile(report, out / PROFILE_FILE),
    }
    data = report.to_dict()
    data["histogram_layer"] = name
    data["files"] = {k: p.name for k, p in paths.items()}
    paths["json"] = out / JSON_FILE
    paths["json"].write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")
    paths["markdown"] = out / MARKDOWN_FILE
    paths["markdown"].write_text(markdown_table(report) + f"\n![quantization loss]({HISTOGRAM_FILE})\n\n"
                                 f"![error profile]({PROFILE_FILE})\n")
    return paths


def report_calibration(tokenizer, samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                       text: str | None = None) -> Tensor:
    """Calibration windows for a report: the built-in corpus (or ``text``), another seed than AWQ/GPTQ's."""
    from quantchat.quant.calibration import calibration_batches

    return calibration_batches(tokenizer, n_samples=samples, seq_len=seq_len, text=text, seed=DEFAULT_SEED)
