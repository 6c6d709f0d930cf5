"""The one results format of quantchat's measurements: ``Results`` (a kind, a common ``meta`` block, the
kind's own fields), written and read as JSON by ``quantchat bench`` (results.json), ``quantchat bench
serve`` and every ``quantchat eval`` command (result.json); the plots read it back (benchmark.plots).

A results file is one JSON object: ``{"kind": ..., "meta": {...}, <the kind's fields>}``. The fields stay
top-level keys (``variants``, ``peers``, ``rows``, ``ppl``...), as in the files written before ``meta``
existed; such older files (without ``kind`` / ``meta``) still load: ``Results.read`` infers the kind.
Also here: the output folders (``./quantchat-results/<command>-<timestamp>/``) and the markdown tables.
Torch-free (torch's version is recorded when torch is already imported).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import quantchat
from quantchat.errors import QuantchatError
from quantchat.kernels import cpu_features

RESULTS_DIR = "quantchat-results"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the quantchat package
KINDS = ("bench", "bench-serve", "bench-serve-locust", "eval-ppl", "eval-kl", "eval-mc", "eval-compare",
         "core-bench", "kernel-bench", "quant-bench", "startup", "bench-structured")


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


def git_commit(root: Path = PACKAGE_ROOT) -> str | None:
    """The checkout's commit (with ``-dirty`` for uncommitted changes), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


SECRET_FLAGS = ("--api-key", "--secret")


def masked_argv(argv: Sequence[str]) -> list[str]:
    """The command line with the values of --api-key / --secret replaced by "***"."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in SECRET_FLAGS:
            arg = "***"
        elif arg.startswith(tuple(f + "=" for f in SECRET_FLAGS)):
            arg = arg.split("=", 1)[0] + "=***"
        out.append(arg)
    return out


def run_meta(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The common ``meta`` block: what produced a result (command line, versions, git commit, time) and on
    what machine (CPU model, cores, the quantchat CPU kernels variant loaded, torch's threads)."""
    argv = masked_argv(sys.argv if argv is None else argv)
    torch = sys.modules.get("torch")  # not imported here: the bench driver stays torch-free until it loads one
    kernels = sys.modules.get("quantchat.kernels.cpu")
    return {
        "command": " ".join(argv),
        "argv": argv,
        "quantchat": quantchat.__version__,
        "git_commit": git_commit(),
        "cpu_model": cpu_features.cpu_model(),
        "nproc": os.cpu_count(),
        "kernels_variant": kernels.build_info().get("variant") if kernels is not None else None,
        "torch": getattr(torch, "__version__", None),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "time": datetime.now().isoformat(timespec="seconds"),
        "unix_time": time.time(),
    }


@dataclass
class Results:
    """One run's results: ``kind`` (see KINDS), the common ``meta`` block (``run_meta``, plus a kind's
    own run details), and ``fields``: the kind's top-level keys (bench: source, options, model, method,
    variants, peers, ratios, notes...; bench-serve: options, rows; eval-*: the command's numbers)."""

    kind: str
    meta: dict[str, Any] = field(default_factory=run_meta)
    fields: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.meta if key == "meta" else self.fields[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.fields[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta if key == "meta" else self.fields.get(key, default)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The measured rows: bench-serve's rows, bench's variants then peers, eval-mc's subjects."""
        if self.kind == "bench":
            return list(self.fields.get("variants", [])) + list(self.fields.get("peers", []))
        if self.kind == "eval-mc":
            return [{"subject": k, **v} for k, v in self.fields.get("subjects", {}).items()]
        return list(self.fields.get("rows", []))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "meta": self.meta, **self.fields}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Results:
        data = dict(data)
        kind = data.pop("kind", None) or infer_kind(data)
        meta = data.pop("meta", None) or data.get("context") or {}
        return cls(kind, dict(meta), data)

    def write(self, path: str | Path) -> Path:
        """JSON (NaN/inf as null), written atomically: a run killed midway keeps its last complete file."""
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        write_json(tmp, self.to_dict())
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> Results:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QuantchatError(f"{path}: cannot read results ({e})") from None
        if not isinstance(data, dict):
            raise QuantchatError(f"{path}: not a results file (expected a JSON object)")
        return cls.from_dict(data)


def infer_kind(data: dict[str, Any]) -> str:
    """The kind of a results file written before ``kind`` existed."""
    if "variants" in data and "peers" in data:
        return "bench"
    command = data.get("command")
    if isinstance(command, str) and command.startswith("eval "):
        return "eval-" + command.split()[1]
    if "rows" in data and "options" in data:
        return "bench-serve"
    return "unknown"


def write_results(out_dir: Path, title: str, results: Results, markdown: str,
                  name: str = "result") -> tuple[Path, Path]:
    """``<name>.json`` (the results) and ``<name>.md`` (``markdown`` under ``title``) in ``out_dir``."""
    return results.write(out_dir / f"{name}.json"), write_markdown(out_dir / f"{name}.md", title, markdown)


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


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
