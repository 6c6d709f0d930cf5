"""PNG plots of measurement results, drawn from ``Results`` (benchmark.results) with matplotlib's Agg
canvas (no display, no global pyplot state).

``quantchat bench`` (``make_plots``):

* decode_latency.png: median decode latency per variant (bars, p10–p90 whiskers, tokens/s on top);
* ttft.png: time to first token vs prompt length, one line per variant (llama.cpp dashed);
* memory.png: resident memory per variant (RSS after decode and peak RSS; GPU max allocated on CUDA)
  beside the weights' size.

``quantchat bench serve``: throughput.png (``plot_serving``); ``quantchat eval``: ppl_windows.png
(``plot_ppl``), kl_histogram.png (``plot_kl_histogram``: per-token values, which the results file does not
keep), mc_accuracy.png (``plot_mc``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from quantchat.benchmark.results import Results
from quantchat.errors import QuantchatError

QC_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#17becf", "#bcbd22", "#393b79", "#637939")
PEER_COLORS = ("#d62728", "#8c564b", "#e377c2", "#7f7f7f")  # llama.cpp rows
BENCH_DPI = 110  # the bench and bench serve PNGs; eval's are drawn at the figure's 100 dpi


def _figure(width: float = 8.0, height: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _axes(width: float = 8.0, height: float = 4.5):
    fig = _figure(width, height)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Figure, path: Path, dpi: float | None = None) -> Path:
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=dpi or "figure")
    except OSError as e:
        raise QuantchatError(f"{path}: cannot write ({e})") from None
    return path


def _measured(report: Results) -> list[dict]:
    return [r for r in report.rows if "decode" in r and not r.get("error")]


def _title(report: Results, what: str) -> str:
    src = report["source"]
    o = report["options"]
    tag = " (synthetic, random weights)" if src.get("synthetic") else ""
    return f"{what}: {src['name']}{tag}\n{o['device']} {o['dtype']}, {o['threads']} thread(s)"


def make_plots(report: Results, out_dir: Path) -> list[Path]:
    """decode_latency.png, ttft.png and memory.png of a ``quantchat bench`` run in ``out_dir``."""
    out_dir = Path(out_dir)
    rows = _measured(report)
    files: list[Path] = []
    peer_index = {id(r): k for k, r in enumerate(r for r in rows if r.get("engine") == "llama.cpp")}

    def color(i: int, r: dict) -> str:
        if id(r) in peer_index:
            return PEER_COLORS[peer_index[id(r)] % len(PEER_COLORS)]
        return QC_COLORS[i % len(QC_COLORS)]

    # decode latency
    fig, ax = _axes(max(5.0, 1.1 * len(rows) + 2), 4.2)
    labels = [r["label"] for r in rows]
    med = [r["decode"]["latency_ms"]["median"] for r in rows]
    lo = [m - r["decode"]["latency_ms"]["p10"] for m, r in zip(med, rows)]
    hi = [r["decode"]["latency_ms"]["p90"] - m for m, r in zip(med, rows)]
    bars = ax.bar(range(len(rows)), med, yerr=[lo, hi], capsize=4,
                  color=[color(i, r) for i, r in enumerate(rows)])
    for b, r in zip(bars, rows):
        ax.annotate(f"{r['decode']['tokens_per_s']:.1f} tok/s", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
    ax.set_ylabel("decode latency, ms/token (median, p10–p90)")
    ax.set_title(_title(report, "Decode latency"), fontsize=10)
    ax.margins(y=0.15)
    files.append(_save(fig, out_dir / "decode_latency.png", BENCH_DPI))

    # TTFT vs prompt length
    fig, ax = _axes(6.4, 4.2)
    drawn = False
    for i, r in enumerate(rows):
        pts = sorted((t["prompt_len"], t["ms"]["median"]) for t in r.get("ttft", []) if "ms" in t)
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="s" if r.get("engine") == "llama.cpp" else "o", label=r["label"], color=color(i, r),
                linestyle="--" if r.get("engine") == "llama.cpp" else "-")
        drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ticks = sorted({t["prompt_len"] for r in rows for t in r.get("ttft", []) if "ms" in t})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no prompt length measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time to first token, ms (median)")
    ax.set_title(_title(report, "Time to first token"), fontsize=10)
    ax.grid(True, alpha=0.3)
    files.append(_save(fig, out_dir / "ttft.png", BENCH_DPI))

    # memory
    gpu = any(r.get("cuda_max_allocated_mb") is not None for r in rows)
    series = [("RSS after decode", "rss_mb"), ("peak RSS", "peak_rss_mb")]
    if gpu:
        series.append(("GPU max allocated", "cuda_max_allocated_mb"))
    series.append(("weights (size)", None))
    fig, ax = _axes(max(5.0, 1.4 * len(rows) + 2), 4.2)
    width = 0.8 / len(series)
    for j, (name, key) in enumerate(series):
        vals = [((r.get("size_bytes") or 0) / 1e6) if key is None else (r.get(key) or 0) for r in rows]
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))], vals, width, label=name)
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
    ax.set_ylabel("MB")
    ax.set_title(_title(report, "Memory"), fontsize=10)
    ax.legend(fontsize=8)
    files.append(_save(fig, out_dir / "memory.png", BENCH_DPI))
    return files


def plot_serving(results: Results, path: Path) -> Path:
    """``quantchat bench serve``: generated tokens/s of all clients vs concurrent clients, one line per setup."""
    rows = results.rows
    fig, ax = _axes(8, 4.5)
    for s in dict.fromkeys(r["setup"] for r in rows):
        pts = sorted((r["clients"], r["tokens_per_s"]) for r in rows if r["setup"] == s)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("generated tokens/s (all clients)")
    ax.set_title("serving throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, BENCH_DPI)


def ppl_series(results: Results) -> dict[str, list[float]]:
    """``quantchat eval ppl``: the perplexity of each window, per engine."""
    quant = results["quant"]
    series = {f"quantchat ({results['dtype'] if quant == 'none' else quant})": results["window_ppl"]}
    peer = results.get("peer")
    if peer:
        series[f"llama.cpp ({Path(peer['gguf']).name})"] = peer["window_ppl"]
    return series


def plot_ppl(results: Results, path: Path) -> Path:
    """``quantchat eval ppl``: one line per engine, the perplexity of each window in order."""
    series = ppl_series(results)
    fig, ax = _axes()
    for label, values in series.items():
        values = [math.nan if v is None else v for v in values]  # JSON null: a NaN/inf perplexity
        ax.plot(range(len(values)), values, marker="." if len(values) < 200 else None, linewidth=1, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("window")
    ax.set_ylabel("perplexity")
    values = [v for vals in series.values() for v in vals if v is not None and math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_title(f"perplexity per window ({results['model']}, window {results['window']})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_kl_histogram(path: Path, kl: Sequence[float], title: str = "KL(reference || model) per token") -> Path:
    """Histogram of per-token KL on a log x axis (values at or below 1e-12 are drawn in the first bin)."""
    values = np.maximum(np.asarray(kl, dtype=np.float64), 1e-12)
    fig, ax = _axes()
    lo, hi = math.log10(values.min()), math.log10(values.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    ax.hist(values, bins=np.logspace(lo, hi, 60))
    ax.set_xscale("log")
    ax.set_xlabel("KL divergence (nats)")
    ax.set_ylabel("tokens")
    ax.axvline(float(values.mean()), color="red", linestyle="--", label=f"mean {values.mean():.4g}")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_mc(results: Results, path: Path) -> Path:
    """``quantchat eval mc``: accuracy per subject."""
    labels = [r["subject"] for r in results.rows]
    fig, ax = _axes(max(6.0, 0.35 * len(labels) + 2), 4.5)
    ax.bar(range(len(labels)), [r["accuracy"] for r in results.rows])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center",
                       fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{results['model']} ({results['quant']}): {100 * results['accuracy']:.1f}% overall")
    return _save(fig, path)
