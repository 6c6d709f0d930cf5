"""PNG plots of a ``quantchat bench`` report (matplotlib, Agg backend: no display needed).

* decode_latency.png: median decode latency per variant (bars, p10–p90 whiskers, tokens/s on top);
* ttft.png: time to first token vs prompt length, one line per variant (llama.cpp dashed);
* memory.png: resident memory per variant (RSS after decode and peak RSS; GPU max allocated on CUDA)
  beside the weights' size.
"""

from __future__ import annotations

from pathlib import Path

QC_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#17becf", "#bcbd22", "#393b79", "#637939")
PEER_COLORS = ("#d62728", "#8c564b", "#e377c2", "#7f7f7f")  # llama.cpp rows


def _measured(report: dict) -> list[dict]:
    return [r for r in report["variants"] + report["peers"] if "decode" in r and not r.get("error")]


def _title(report: dict, what: str) -> str:
    src = report["source"]
    o = report["options"]
    tag = " (synthetic, random weights)" if src.get("synthetic") else ""
    return f"{what}: {src['name']}{tag}\n{o['device']} {o['dtype']}, {o['threads']} thread(s)"


def make_plots(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = _measured(report)
    files: list[Path] = []
    peer_index = {id(r): k for k, r in enumerate(r for r in rows if r.get("engine") == "llama.cpp")}

    def color(i: int, r: dict) -> str:
        if id(r) in peer_index:
            return PEER_COLORS[peer_index[id(r)] % len(PEER_COLORS)]
        return QC_COLORS[i % len(QC_COLORS)]

    # decode latency
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.2))
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
    fig.tight_layout()
    files.append(_save(fig, out_dir / "decode_latency.png", plt))

    # TTFT vs prompt length
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
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
    fig.tight_layout()
    files.append(_save(fig, out_dir / "ttft.png", plt))

    # memory
    gpu = any(r.get("cuda_max_allocated_mb") is not None for r in rows)
    series = [("RSS after decode", "rss_mb"), ("peak RSS", "peak_rss_mb")]
    if gpu:
        series.append(("GPU max allocated", "cuda_max_allocated_mb"))
    series.append(("weights (size)", None))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(rows) + 2), 4.2))
    width = 0.8 / len(series)
    for j, (name, key) in enumerate(series):
        vals = [((r.get("size_bytes") or 0) / 1e6) if key is None else (r.get(key) or 0) for r in rows]
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))], vals, width, label=name)
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
    ax.set_ylabel("MB")
    ax.set_title(_title(report, "Memory"), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(_save(fig, out_dir / "memory.png", plt))
    return files


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
