"""What the Python side and the C++ kernels must agree on, defined once: the kernels' code paths and
the layout of the fused decode step's plan.

``cpu.py`` writes this module's ``header()`` as ``quantchat_defs.h`` next to the sources of every build
(its text is part of the build's cache key), so the C++ reads the same names and numbers as enums and
named indices; ``python -m quantchat.kernels.defs`` prints it. Torch-free.

* ``Path`` / ``R8Path``: the ``path`` argument of ``int4_linear`` / ``int8_linear`` and of
  ``int4r8_linear`` (what each path does: ``quantchat.kernels.cpu``). C++: ``kPathAuto``, ``kR8Q8``, ...
* ``LinearKind``: how ``DecodePlan`` runs one linear. C++: ``kFloat``, ``kInt4R8``, ...
* The plan: ``DecodePlan(meta, floats, tensors)`` takes three flat lists. ``PLAN_META`` heads ``meta``,
  ``PLAN_FLOATS`` are ``floats``; then each layer's ``LAYER`` fields, then the ``FINAL`` ones. A tensor
  field is one tensor; a number field one entry of meta; a linear field is ``LINEAR_TENSORS`` tensors and
  ``LINEAR_META`` numbers (meta holds each layer's numbers and linears, then the final ones, in field
  order). ``plan_lists`` makes the lists from dicts by name. C++: ``kLayerWo`` (the first
  tensor of a layer's wo), ``kLayerMetaWo`` (its first number in the layer's meta), ``kLayerTensors``,
  ``kLinBias``, ``kLinGroupSize``, ``kMetaHeadDim``, ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import IntEnum


class Path(IntEnum):
    """int4_linear / int8_linear's kernel path."""

    # AUTO = float GEMV for M <= 12, tiles + sgemm above; GEMV / TILED force one (tests, benchmarks). Opt-in:
    # GEMV_I16 = GEMV with the activations rounded to int16 (int4: per weight group, int8: per row; exact
    # integer products; int4 ~1.2-1.7x, int8 ~1.1x faster than the float GEMV; output error ~2e-5 of its
    # magnitude: far below bfloat16 rounding, but not float32-exact; int8 rows come out the same in any
    # batch); AUTO_I16 = that GEMV for M <= 12, above it tiles (int4) or a GEMM on int16 activations per 128
    # columns (int8). The fused decode step runs int8 layers (the LM head) on GEMV_I16.
    # AMX_1/2/3: the AMX-BF16 GEMM (amx variant only) with 1, 2 or 3 bf16 products per float product (see
    # x86/amx_gemm.h); PREFILL: the fastest prefill path of this build for the rows given (AMX from 48 rows
    # where there, else AUTO_I16 (int8) / AUTO (int4)): QuantizedLinear's default
    AUTO = 0
    GEMV = 1
    TILED = 2
    GEMV_I16 = 3
    AUTO_I16 = 4
    AMX_1 = 5
    AMX_2 = 6
    AMX_3 = 7
    PREFILL = 8


class R8Path(IntEnum):
    """int4r8_linear's kernel path (int4, rows interleaved by 8)."""

    # EXACT = float32 activations (up to 16 rows: one 8-row block dequantized into L1 at a time and multiplied
    # with up to 6 rows at once, each row's sums in a fixed order; above: dequantized tiles + sgemm); Q8 =
    # GEMV on int8 activations (per 32 columns, as llama.cpp's Q8_0): the decode path, 2-3x the float GEMV's
    # speed; EXACT_SMALL = EXACT's small-M kernel at any M (tests, benchmarks); I16 = GEMM on int16
    # activations (per row and weight group; vpmaddwd on 16 rows unpacked at a time, a 6 x 16 register
    # block): 1.1-2.3x EXACT at every M, output error ~3e-5 of its magnitude, each row's result independent
    # of the other rows; AMX_1/2/3 and PREFILL as in Path (PREFILL: AMX from 48 rows, else I16;
    # QuantizedLinear's default)
    EXACT = 0
    Q8 = 1
    EXACT_SMALL = 2
    I16 = 3
    AMX_1 = 4
    AMX_2 = 5
    AMX_3 = 6
    PREFILL = 7


class LinearKind(IntEnum):
    """How DecodePlan runs a linear: float [N, K] or transposed [K, N], int4, int8, int4 in the r8 layout."""

    FLOAT = 0
    INT4 = 1
    INT8 = 2
    FLOAT_T = 3
    INT4_R8 = 4


TENSOR, LINEAR, NUMBER = "tensor", "linear", "number"
# one linear: float (a = the weight), int4 (a, b, c = packed, scales, mins), int8 (a, b = qweight, scales);
# bias empty when there is none. INT8: group_size holds int8_linear's path
LINEAR_TENSORS = ("a", "b", "c", "bias")
LINEAR_META = ("kind", "group_size", "in_features", "out_features")
# the model's shape and layout (norm: 0 RMSNorm, 1 LayerNorm; activation: ACTIVATION's index; gated: gate *
# up (w13) or a plain MLP (w13 holds w1); parallel: x + attn(n(x)) + mlp(n'(x)); shared_norm: n' = n;
# position: POSITION's index (learned positions are added to the embeddings before the step))
PLAN_META = ("n_layer", "dim", "n_head", "n_kv_head", "head_dim", "hidden", "norm", "activation", "gated",
             "parallel", "shared_norm", "position")
PLAN_FLOATS = ("norm_eps", "attn_scale", "clip_qkv")  # clip_qkv 0: no clamp
NORMS = ("rms", "layer")
ACTIVATION = ("silu", "gelu", "gelu_tanh")
POSITION = ("rope", "learned", "alibi")
# a layer: norm biases (LayerNorm), q/k norms (per head, RMS) and the norms after attention and after the MLP
# (Gemma) are empty tensors where the model has none; window: its sliding window (0: none); local: it reads
# the local rope tables
LAYER = (("window", NUMBER), ("local", NUMBER), ("attn_norm", TENSOR), ("attn_norm_bias", TENSOR),
         ("wqkv", LINEAR), ("q_norm", TENSOR), ("k_norm", TENSOR), ("wo", LINEAR), ("post_attn_norm", TENSOR),
         ("ffn_norm", TENSOR), ("ffn_norm_bias", TENSOR), ("w13", LINEAR), ("w2", LINEAR),
         ("post_ffn_norm", TENSOR), ("k_cache", TENSOR), ("v_cache", TENSOR))
# rope tables empty without rope (local ones without local layers); alibi: the per-head slopes, or empty
FINAL = (("norm", TENSOR), ("norm_bias", TENSOR), ("head", LINEAR), ("rope_cos", TENSOR), ("rope_sin", TENSOR),
         ("rope_cos_local", TENSOR), ("rope_sin_local", TENSOR), ("alibi", TENSOR))


class PlanMismatch(RuntimeError):
    """A plan's dict does not have exactly the fields of the layout (a bug in the caller, not a model
    the fused step cannot run)."""


def _check_keys(what: str, got: Mapping, want: Sequence[str]) -> None:
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:
        raise PlanMismatch(f"DecodePlan {what}: missing {missing or 'nothing'}, unknown {extra or 'nothing'} "
                           f"(the fields are {', '.join(want)}: quantchat/kernels/defs.py)")


def _add_fields(what: str, fields: tuple, values: Mapping, meta: list, tensors: list) -> None:
    _check_keys(what, values, [name for name, _ in fields])
    linear_meta = []
    for name, kind in fields:
        if kind == LINEAR:
            lin = values[name]
            _check_keys(f"{what} {name}", lin, LINEAR_TENSORS + LINEAR_META)
            tensors.extend(lin[k] for k in LINEAR_TENSORS)
            linear_meta.extend(int(lin[k]) for k in LINEAR_META)
        elif kind == NUMBER:
            linear_meta.append(int(values[name]))
        else:
            tensors.append(values[name])
    meta.extend(linear_meta)


def plan_lists(plan_meta: Mapping[str, int], floats: Mapping[str, float], layers: Sequence[Mapping],
               final: Mapping) -> tuple[list[int], list[float], list]:
    """``DecodePlan``'s (meta, floats, tensors) from dicts by field name: ``plan_meta`` with the
    ``PLAN_META`` keys, ``floats`` with the ``PLAN_FLOATS`` ones, one dict per layer with the ``LAYER``
    fields, ``final`` with the ``FINAL`` ones; a linear field is a dict with the ``LINEAR_TENSORS`` and
    ``LINEAR_META`` keys, a number field an int. ``PlanMismatch`` names any field missing or unknown."""
    _check_keys("meta", plan_meta, PLAN_META)
    _check_keys("floats", floats, PLAN_FLOATS)
    meta = [int(plan_meta[k]) for k in PLAN_META]
    tensors: list = []
    for i, layer in enumerate(layers):
        _add_fields(f"layer {i}", LAYER, layer, meta, tensors)
    _add_fields("final", FINAL, final, meta, tensors)
    return meta, [float(floats[k]) for k in PLAN_FLOATS], tensors


# ------------------------------------------------------------------------------------------------
# the C++ header
# ------------------------------------------------------------------------------------------------
def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _enum(cname: str, prefix: str, e: type[IntEnum], last: str) -> str:
    items = [f"{prefix}{_camel(m.name)} = {int(m)}" for m in e]
    items.append(f"{last} = {max(int(m) for m in e)}")
    return f"// {e.__doc__}\nenum {cname} : int64_t {{ {', '.join(items)} }};\n"


def _indices(prefix: str, names: Sequence[str]) -> str:
    return "".join(f"constexpr int64_t {prefix}{_camel(n)} = {i};\n" for i, n in enumerate(names))


def layout(fields: tuple) -> tuple[dict[str, int], dict[str, int], int, int]:
    """Where ``fields`` (``LAYER`` or ``FINAL``) put each field: (first tensor per field, first meta number
    per linear field, tensors in all, meta numbers in all)."""
    tensor_at, meta_at, t, m = {}, {}, 0, 0
    for name, kind in fields:
        if kind == NUMBER:
            meta_at[name] = m
            m += 1
            continue
        tensor_at[name] = t
        if kind == LINEAR:
            meta_at[name] = m
            t, m = t + len(LINEAR_TENSORS), m + len(LINEAR_META)
        else:
            t += 1
    return tensor_at, meta_at, t, m


def _layout(prefix: str, fields: tuple) -> str:
    tensor_at, meta_at, n_tensors, n_meta = layout(fields)
    out = []
    for name, _ in fields:
        if name in tensor_at:
            out.append(f"constexpr int64_t {prefix}{_camel(name)} = {tensor_at[name]};\n")
        if name in meta_at:
            out.append(f"constexpr int64_t {prefix}Meta{_camel(name)} = {meta_at[name]};\n")
    out.append(f"constexpr int64_t {prefix}Tensors = {n_tensors};\nconstexpr int64_t {prefix}Meta = {n_meta};\n")
    return "".join(out)


def header() -> str:
    """``quantchat_defs.h``: this module's definitions for the C++ sources."""
    return "".join((
        "// Generated from quantchat/kernels/defs.py at build time (kernels/cpu.py): edit that file, not this one.\n",
        "#pragma once\n\n#include <cstdint>\n\n",
        _enum("Path", "kPath", Path, "kPathLast"),
        _enum("R8Path", "kR8", R8Path, "kR8Last"),
        _enum("LinearKind", "k", LinearKind, "kLinearKindLast"),
        "\n// DecodePlan's meta: the model's shape first\n", _indices("kMeta", PLAN_META),
        f"constexpr int64_t kPlanMeta = {len(PLAN_META)};\n",
        "// DecodePlan's floats\n", _indices("kFloats", PLAN_FLOATS),
        f"constexpr int64_t kPlanFloats = {len(PLAN_FLOATS)};\n",
        "// one linear: its tensors and its numbers\n", _indices("kLin", LINEAR_TENSORS), _indices("kLin", LINEAR_META),
        "// each layer's fields: offsets into its tensors (and its meta, for the numbers and linears)\n", _layout("kLayer", LAYER),
        "// after the layers\n", _layout("kFinal", FINAL),
    ))


if __name__ == "__main__":
    print(header(), end="")
