"""Writing evaluation results: one output folder per run with a JSON file, a markdown table and plots.

Every ``quantchat eval`` command writes ``result.json`` (its numbers plus the run's context: command
line, versions, time) and ``result.md`` (a markdown table) into ``--out DIR``, by default
``./quantchat-results/<command>-<timestamp>/``. Plots are drawn with matplotlib's Agg canvas (no
display, no global pyplot state).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from quantchat.errors import QuantchatError

RESULTS_DIR = "quantchat-results"


def default_out_dir(command: str, base: str | Path = RESULTS_DIR) -> Path:
    """./quantchat-results/<command>-<YYYYmmdd-HHMMSS>, with a -2, -3... suffix if that already exists."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(base) / f"{command}-{stamp}"
    n = 2
    while out.exists():
        out = Path(base) / f"{command}-{stamp}-{n}"
        n += 1
    return out


def prepare_out_dir(out: str | Path | None, command: str) -> Path:
    path = Path(out).expanduser() if out else default_out_dir(command)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantchatError(f"{path}: cannot create the output folder ({e})") from None
    if not path.is_dir():
        raise QuantchatError(f"{path}: not a folder")
    return path


def run_context(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What produced a result: command line, versions, machine, time."""
    import torch

    import quantchat

    return {
        "argv": list(sys.argv if argv is None else argv),
        "quantchat": quantchat.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "time": datetime.now().isoformat(timespec="seconds"),
        "unix_time": time.time(),
    }


def _json_default(obj: Any):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, data: dict[str, Any]) -> Path:
    text = json.dumps(_finite(json.loads(json.dumps(data, default=_json_default))), indent=1, ensure_ascii=False)
    try:
        path.write_text(text + "\n", encoding="utf-8")
    except OSError as e:
        raise QuantchatError(f"{path}: cannot write ({e})") from None
    return path


def md_escape(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(md_escape(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(path: Path, title: str, body: str) -> Path:
    try:
        path.write_text(f"# {title}\n\n{body.rstrip()}\n", encoding="utf-8")
    except OSError as e:
        raise QuantchatError(f"{path}: cannot write ({e})") from None
    return path


def write_results(out_dir: Path, title: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """result.json (data plus run context) and result.md in ``out_dir``."""
    data = {**data, "context": run_context()}
    return write_json(out_dir / "result.json", data), write_markdown(out_dir / "result.md", title, markdown)


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"


# -- plots ----------------------------------------------------------------------------------------

def _figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as e:
        raise QuantchatError(f"{path}: cannot write ({e})") from None
    return path


def plot_window_ppl(path: Path, series: dict[str, Sequence[float]], title: str = "perplexity per window") -> Path:
    """One line per engine/model: the perplexity of each window, in order."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, values in series.items():
        ax.plot(range(len(values)), values, marker="." if len(values) < 200 else None, linewidth=1, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("window")
    ax.set_ylabel("perplexity")
    values = [v for vals in series.values() for v in vals if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_kl_histogram(path: Path, kl: Sequence[float], title: str = "KL(reference || model) per token") -> Path:
    """Histogram of per-token KL on a log x axis (values at or below 1e-12 are drawn in the first bin)."""
    import numpy as np

    values = np.maximum(np.asarray(kl, dtype=np.float64), 1e-12)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
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


def plot_bars(path: Path, labels: Sequence[str], values: Sequence[float], ylabel: str, title: str) -> Path:
    fig = _figure(max(6.0, 0.35 * len(labels) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(labels)), values)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center",
                       fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)
