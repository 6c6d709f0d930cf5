"""kernels/defs.py: the code paths and the decode plan's layout, defined once for Python and the C++
(the generated quantchat_defs.h). Torch-free checks, plus the cache key."""

from __future__ import annotations

import re

import pytest

from quantchat.kernels import cpu, defs


def header_constants() -> dict[str, int]:
    """Every ``kName = value`` of the generated header (enumerators and constexprs)."""
    return {name: int(v) for name, v in re.findall(r"\b(k\w+) = (\d+)", defs.header())}


def test_header_has_every_path_and_kind_with_its_value():
    consts = header_constants()
    for enum, prefix in ((defs.Path, "kPath"), (defs.R8Path, "kR8"), (defs.LinearKind, "k")):
        for m in enum:
            assert consts[prefix + defs._camel(m.name)] == m, m
    assert consts["kPathLast"] == max(defs.Path) and consts["kR8Last"] == max(defs.R8Path)
    assert consts["kPathGemvI16"] == defs.Path.GEMV_I16 and consts["kR8Q8"] == defs.R8Path.Q8


def test_cpu_exports_the_enums_under_their_flat_names():
    for m in defs.Path:
        assert getattr(cpu, f"PATH_{m.name}") is m and f"PATH_{m.name}" in cpu.__all__
    for m in defs.R8Path:
        assert getattr(cpu, f"R8_{m.name}") is m and f"R8_{m.name}" in cpu.__all__


def sample_plan(n_layer: int = 2):
    """Dicts whose every value names its own field (tensors as strings, numbers distinct)."""
    counter = iter(range(1000, 10**6))

    def fields(prefix: str, spec: tuple) -> dict:
        out = {}
        for name, kind in spec:
            if kind == defs.LINEAR:
                out[name] = {k: f"{prefix}{name}.{k}" for k in defs.LINEAR_TENSORS}
                out[name] |= {k: next(counter) for k in defs.LINEAR_META}
            elif kind == defs.NUMBER:
                out[name] = next(counter)
            else:
                out[name] = f"{prefix}{name}"
        return out

    meta = {k: next(counter) for k in defs.PLAN_META}
    floats = {k: float(next(counter)) for k in defs.PLAN_FLOATS}
    return meta, floats, [fields(f"L{i}.", defs.LAYER) for i in range(n_layer)], fields("F.", defs.FINAL)


def test_the_header_indices_find_what_plan_lists_put_there():
    """What C++ reads at kLayerWo + kLinBias (and so on) is what Python put under that name."""
    c = header_constants()
    plan_meta, floats, layers, final = sample_plan()
    meta, float_list, tensors = defs.plan_lists(plan_meta, floats, layers, final)
    n = len(layers)
    assert float_list[c["kFloatsAttnScale"]] == floats["attn_scale"] and len(float_list) == c["kPlanFloats"]
    assert len(tensors) == c["kLayerTensors"] * n + c["kFinalTensors"]
    assert len(meta) == c["kPlanMeta"] + c["kLayerMeta"] * n + c["kFinalMeta"]
    assert meta[c["kMetaHeadDim"]] == plan_meta["head_dim"] and meta[c["kMetaNLayer"]] == plan_meta["n_layer"]
    for i, layer in enumerate(layers):
        ti, mi = c["kLayerTensors"] * i, c["kPlanMeta"] + c["kLayerMeta"] * i
        for name, kind in defs.LAYER:
            if kind == defs.NUMBER:
                assert meta[mi + c[f"kLayerMeta{defs._camel(name)}"]] == layer[name]
                continue
            at = ti + c[f"kLayer{defs._camel(name)}"]
            if kind == defs.TENSOR:
                assert tensors[at] == f"L{i}.{name}"
                continue
            for k in defs.LINEAR_TENSORS:
                assert tensors[at + c[f"kLin{defs._camel(k)}"]] == f"L{i}.{name}.{k}"
            for k in defs.LINEAR_META:
                assert meta[mi + c[f"kLayerMeta{defs._camel(name)}"] + c[f"kLin{defs._camel(k)}"]] == layer[name][k]
    ti, mi = c["kLayerTensors"] * n, c["kPlanMeta"] + c["kLayerMeta"] * n
    assert tensors[ti + c["kFinalRopeSin"]] == "F.rope_sin" and tensors[ti + c["kFinalNorm"]] == "F.norm"
    assert tensors[ti + c["kFinalHead"] + c["kLinA"]] == "F.head.a"
    assert meta[mi + c["kFinalMetaHead"] + c["kLinKind"]] == final["head"]["kind"]


@pytest.mark.parametrize("where", ["meta", "layer", "linear", "final"])
def test_a_missing_or_unknown_field_is_named(where):
    plan_meta, floats, layers, final = sample_plan()
    if where == "meta":
        del plan_meta["head_dim"]
        want = "head_dim"
    elif where == "layer":
        layers[1]["extra_norm"] = "x"
        want = "layer 1: missing nothing, unknown \\['extra_norm'\\]"
    elif where == "linear":
        del layers[0]["wo"]["bias"]
        want = "layer 0 wo: missing \\['bias'\\]"
    else:
        del final["rope_cos"]
        want = "final: missing \\['rope_cos'\\]"
    with pytest.raises(defs.PlanMismatch, match=want):
        defs.plan_lists(plan_meta, floats, layers, final)


def test_the_generated_header_is_part_of_the_cache_key(monkeypatch):
    try:
        cxx = cpu._compiler()
    except cpu.KernelsUnavailable as e:
        pytest.skip(str(e))
    v = cpu.VARIANTS[0]
    key = cpu._cache_key(cxx, v)
    monkeypatch.setattr(defs, "header", lambda: "// another layout\n")
    assert cpu._cache_key(cxx, v) != key
