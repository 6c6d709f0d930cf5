"""Quantize a loaded model in memory: swap every linear for a ``QuantizedLinear``.

Methods: ``int8`` (per-channel), ``int4-sym`` / ``int4-asym`` (group-wise round-to-nearest),
``awq`` (activation-aware scales + clipping, then int4) and ``gptq`` (Hessian-based int4).
The LM head is kept at int8 for the int4 methods (as llama.cpp keeps it at 8 bits or more); a
tied token embedding then reads the head's int8 rows, so no float copy of the vocabulary stays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from quantchat import progress as bars
from quantchat.errors import QuantchatError
from quantchat.quant import methods, rtn
from quantchat.quant.awq import awq_model
from quantchat.quant.embedding import QuantizedEmbedding
from quantchat.quant.gptq import gptq_model
from quantchat.quant.linear import QuantizedLinear

METHODS = methods.names()
NEEDS_CALIBRATION = methods.calibrated_names()
DEFAULT_GROUP_SIZE = methods.DEFAULT_GROUP_SIZE


@dataclass
class QuantSpec:
    """What a quantized model is: stored in checkpoints as quantchat_quant.json."""

    method: str
    bits: int
    group_size: int | None
    symmetric: bool
    head_bits: int = 8

    @classmethod
    def for_method(cls, method: str, group_size: int | None = None, symmetric: bool | None = None) -> "QuantSpec":
        m = methods.get(method)
        if m.bits == 8:
            return cls(method, 8, None, True)
        gs = group_size or DEFAULT_GROUP_SIZE
        if gs not in methods.GROUP_SIZES:
            raise QuantchatError(f"group size must be {', '.join(map(str, methods.GROUP_SIZES[:-1]))} or "
                                 f"{methods.GROUP_SIZES[-1]}, got {gs}")
        sym = m.symmetric if m.symmetric is not None else bool(symmetric)
        return cls(method, 4, gs, sym)

    def to_dict(self) -> dict:
        return asdict(self)


def linear_names(model: nn.Module) -> list[str]:
    """Every block linear that quantization replaces."""
    return [f"layers.{i}.{n}" for i in range(len(model.layers)) for n in model.config.block_linears]


def float_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """[out, in] float weight and bias of an nn.Linear or TransposedLinear."""
    return module.weight.detach(), getattr(module, "bias", None)


CHUNK_ROWS = 1024  # rows quantized at a time: the float temporaries stay a few MB whatever the weight's size


def quantize_codes(weight: Tensor, spec: QuantSpec, clip: Tensor | None = None) -> dict[str, Tensor]:
    """Portable codes (as checkpoints store them) for one weight by round-to-nearest (rows are independent:
    done ``CHUNK_ROWS`` at a time, the same codes)."""
    w = weight.detach().cpu()
    if spec.bits == 8:
        q, s = rtn.quantize_int8(w, CHUNK_ROWS)
        return {"qweight": q, "scales": s}
    packed, scales, zeros = [], [], []
    for i in range(0, w.shape[0], CHUNK_ROWS):
        q, s, z = rtn.quantize_int4(w[i:i + CHUNK_ROWS].float(), spec.group_size, spec.symmetric,
                                    None if clip is None else clip[i:i + CHUNK_ROWS])
        packed.append(rtn.pack_int4(q))
        scales.append(s)
        zeros.append(z)
    return {"qweight": torch.cat(packed), "scales": torch.cat(scales), "zeros": torch.cat(zeros)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def install_codes(
    model: nn.Module, name: str, codes: dict[str, Tensor], bits: int, group_size: int | None, symmetric: bool,
    in_features: int, out_features: int, bias: Tensor | None, act_dtype: torch.dtype, keep_codes: bool = False,
) -> QuantizedLinear:
    ql = QuantizedLinear.from_codes(codes, in_features, out_features, bits, group_size, symmetric, bias,
                                    model.device, act_dtype, keep_codes)
    set_module(model, name, ql)
    return ql


def install_head(model: nn.Module, codes: dict[str, Tensor], tied: bool, act_dtype: torch.dtype,
                 keep_codes: bool = False) -> None:
    """The int8 LM head; a tied embedding shares its int8 rows."""
    V, D = codes["qweight"].shape
    head = install_codes(model, "output", codes, 8, None, True, D, V, None, act_dtype, keep_codes)
    if tied:
        model.tok_embeddings = QuantizedEmbedding(head.weight_int8, head.scales, act_dtype)


def quantize_on_load(spec: QuantSpec, device: torch.device, act_dtype: torch.dtype
                     ) -> Callable[[nn.Module, str, Tensor], bool]:
    """A ``stream_linear`` hook for ``hf_loader.load_model``: each layer linear is quantized by
    round-to-nearest as soon as its float weight is read, so loading never holds the float model whole
    (the default model's peak RSS while loading: 765 -> 467 MB).
    ``quantize_model`` afterwards leaves those modules as they are and does the rest (the LM head).
    Methods that need calibration take no part."""

    def take(model: nn.Module, name: str, weight: Tensor) -> bool:
        if spec.method in NEEDS_CALIBRATION or name not in linear_names(model):
            return False
        module = model.get_submodule(name)
        codes = quantize_codes(weight, spec)
        set_module(model, name, QuantizedLinear.from_codes(
            codes, module.in_features, module.out_features, spec.bits, spec.group_size, spec.symmetric, None,
            device, act_dtype, False))
        return True

    return take


CALIBRATION_STAGES = {"awq": "awq search", "gptq": "gptq"}  # progress stage of each calibrated method
PACKING_STAGE = "packing"


def stage_progress() -> Callable[[str, int, int], None]:
    """A ``quantize_model`` progress callback: one quantchat.progress bar per stage on stderr. The
    calibrated stages (a block takes seconds to minutes) also print a line per block, with the elapsed
    time and an ETA, where stderr is no terminal; packing shows a bar on a terminal only."""
    stages: dict[str, Callable[[int, int], None]] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in stages:
            calibrated = stage in CALIBRATION_STAGES.values()
            stages[stage] = bars.callback(stage, "block" if calibrated else "module", lines=calibrated,
                                          every=0.0 if calibrated else 1.0)
        stages[stage](done, total)

    return report


def quantize_model(
    model: nn.Module, spec: QuantSpec, calib: Tensor | None = None, keep_codes: bool = False,
    progress: Callable[[str, int, int], None] | None = None, calib_options: dict | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Quantize ``model`` in place; returns the portable codes of every swapped module (for saving).

    ``progress(stage, done, total)`` (e.g. ``stage_progress()``) follows the calibration blocks
    (stage "awq search" or "gptq") and the packing of the modules ("packing"). ``calib_options``: extra
    keyword arguments of ``awq_model`` / ``gptq_model`` (e.g. ``{"fast": False}``: AWQ's reference search)."""
    opts = dict(calib_options or {})
    act_dtype = model.dtype
    names = linear_names(model)
    clips: dict[str, Tensor] = {}
    gptq_codes: dict[str, dict[str, Tensor]] = {}
    if spec.method in NEEDS_CALIBRATION and calib is None:
        raise QuantchatError(f"{spec.method} needs calibration data")
    if spec.method == "awq":
        clips = awq_model(model, calib, spec.group_size, spec.symmetric,
                          progress=(lambda i, n: progress(CALIBRATION_STAGES["awq"], i, n)) if progress else None,
                          **opts)
    elif spec.method == "gptq":
        gptq_codes = gptq_model(model, calib, spec.group_size, spec.symmetric, act_order=True,
                                progress=(lambda i, n: progress(CALIBRATION_STAGES["gptq"], i, n)) if progress
                                else None, **opts)
    all_codes: dict[str, dict[str, Tensor]] = {}
    if progress:
        progress(PACKING_STAGE, 0, len(names) + 1)
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        if isinstance(module, QuantizedLinear):  # quantized while loading (quantize_on_load)
            continue
        weight, bias = float_weight(module)
        codes = gptq_codes.get(name) or quantize_codes(weight, spec, clips.get(name))
        install_codes(model, name, codes, spec.bits, spec.group_size, spec.symmetric,
                      module.in_features, module.out_features, bias, act_dtype, keep_codes)
        all_codes[name] = codes
        if progress:
            progress(PACKING_STAGE, i + 1, len(names) + 1)
    tied = model.config.tie_word_embeddings
    head_codes = quantize_codes(model.output.weight, QuantSpec("int8", 8, None, True))
    install_head(model, head_codes, tied, act_dtype, keep_codes)
    all_codes["output"] = head_codes
    if not tied:
        emb = model.tok_embeddings.weight.detach().float().cpu()
        q, s = rtn.quantize_int8(emb)
        model.tok_embeddings = QuantizedEmbedding(q.to(model.output.weight_int8.device),
                                                  s.to(model.output.weight_int8.device), act_dtype)
        all_codes["tok_embeddings"] = {"qweight": q, "scales": s}
    if progress:
        progress(PACKING_STAGE, len(names) + 1, len(names) + 1)
    return all_codes
