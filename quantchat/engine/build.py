"""Build a ready Engine from a ``--model`` argument: resolve the folder, load (and quantize while loading)
the weights, the tokenizer and the KV cache. The one place where loading, quantization and the engine meet."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantchat.engine.allocator import release_freed_memory
from quantchat.engine.generate import Engine
from quantchat.errors import QuantchatError
from quantchat.kernels import cpu as cpu_kernels
from quantchat.loading.hf_loader import load_model
from quantchat.loading.resolve import ModelSource, resolve_model
from quantchat.quant.checkpoint import is_quantized_dir, load_quantized
from quantchat.quant.quantize import NEEDS_CALIBRATION, QuantSpec, quantize_model, quantize_on_load
from quantchat.tokenizer.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    engine: Engine
    load_s: float


def load_engine(
    spec: str | None, device: str = "auto", dtype: str = "float32", max_seq_len: int | None = None,
    max_batch: int = 1, progress: Callable[[str], None] | None = None, compile: bool = False,
    quant: str | None = None, group_size: int | None = None, kv_cache_dtype: str = "auto",
) -> LoadedModel:
    """Resolve, load weights and tokenizer, and allocate the KV cache (``kv_cache_dtype``: see
    ``pick_kv_dtype``)."""
    t0 = time.perf_counter()
    dev, dt = pick_device(device), pick_dtype(dtype)
    source = resolve_model(spec, progress)
    quantized = is_quantized_dir(source.hf_dir) or quant not in (None, "none")
    if quantized and dev.type == "cpu":
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
        release_freed_memory()  # what loading freed (floats quantized on the way) goes back to the OS
    return LoadedModel(source, engine, time.perf_counter() - t0)
