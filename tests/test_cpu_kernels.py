"""quantchat.kernels.cpu: each kernel equals dequantize-then-matmul (float64 reference) on every path.

int4 weights are what the kernels read: packed codes with float16 scales and mins (``w = code * scale +
min``); the reference dequantizes those same float16 values in float64.

The kernels build on first use (~15-20 s with g++); the build is cached in $QUANTCHAT_KERNELS_DIR when
set, else in the user's quantchat home (``~/.cache/quantchat/kernels``): the cache is keyed by a hash
of the source, the flags, the compiler and torch, so sharing it between test sessions is safe and
saves the rebuild. Everything here is skipped when the kernels cannot be built on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantchat.kernels import cpu, defs
from quantchat.quant import rtn

# evaluated at import, before conftest redirects QUANTCHAT_HOME to a per-session temp dir
_SHARED_KERNELS_DIR = str(cpu.kernels_dir())

PATHS = {"auto": cpu.PATH_AUTO, "gemv": cpu.PATH_GEMV, "tiled": cpu.PATH_TILED}
I16_PATHS = {"gemv_i16": cpu.PATH_GEMV_I16, "auto_i16": cpu.PATH_AUTO_I16}
M_VALUES = (1, 2, 3, 7, 64, 130)
SMOLLM2_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if not _available():
        pytest.skip(f"quantchat CPU kernels unavailable: {cpu.unavailable_reason()}")
    return cpu


def _available() -> bool:
    old = os.environ.get("QUANTCHAT_KERNELS_DIR")
    os.environ.setdefault("QUANTCHAT_KERNELS_DIR", _SHARED_KERNELS_DIR)
    try:
        return cpu.available()
    finally:
        if old is None:
            os.environ.pop("QUANTCHAT_KERNELS_DIR", None)


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
_cache: dict = {}


def ref_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, k: int) -> torch.Tensor:
    """float64 [N, k] weight: code * scale + min from the float16 scales / mins."""
    codes = rtn.unpack_int4(packed).double()
    n, kp = codes.shape
    g = scales.shape[1]
    w = codes.view(n, g, kp // g) * scales.double()[..., None] + mins.double()[..., None]
    return w.view(n, kp)[:, :k]


def int4_weight(n: int, k: int, gs: int, sym: bool, seed: int = 0):
    """(packed, scales float16, mins float16, float64 reference weight)."""
    key = ("int4", n, k, gs, sym, seed)
    if key not in _cache:
        g = torch.Generator().manual_seed(seed * 1000 + n + k + gs)
        w = torch.randn(n, k, generator=g)
        q, s, z = rtn.quantize_int4(w, gs, sym)
        packed = rtn.pack_int4(q)
        s16, m16 = rtn.int4_resident(s, z)
        assert s16.dtype == m16.dtype == torch.float16
        # lossless: the float32 reference of the quantizer's output is the float16 one
        torch.testing.assert_close(rtn.dequantize_int4(q, s, z, k).double(), ref_int4(packed, s16, m16, k),
                                   rtol=0, atol=1e-6)
        _cache[key] = (packed, s16, m16, ref_int4(packed, s16, m16, k))
    return _cache[key]


def int8_weight(n: int, k: int, seed: int = 0):
    key = ("int8", n, k, seed)
    if key not in _cache:
        g = torch.Generator().manual_seed(seed * 1000 + n + k)
        q, s = rtn.quantize_int8(torch.randn(n, k, generator=g))
        _cache[key] = (q, s, rtn.dequantize_int8(q, s).double())
    return _cache[key]


def activations(m: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 7 * m + k))


def assert_matches(y: torch.Tensor, x: torch.Tensor, ref_w: torch.Tensor) -> None:
    """Equal to the float64 reference within float32 accumulation error (bugs are O(1) off)."""
    ref = x.double() @ ref_w.t()
    assert y.shape == ref.shape and y.dtype == x.dtype
    # float32 rounding grows with the sum of |terms|; 1e-5 of it is ~30x the observed error
    bound = 1e-5 * (x.double().abs() @ ref_w.abs().t()) + 1e-6
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound {bound.min().item():.3g}"


def assert_matches_i16(y: torch.Tensor, x: torch.Tensor, ref_w: torch.Tensor, gs: int) -> None:
    """The int16-activation path: x rounded per weight group to absmax/32767 steps (error <= half a step)."""
    ref = x.double() @ ref_w.t()
    m, k = x.shape
    kp = rtn.padded_in_features(k, gs)
    amax = torch.nn.functional.pad(x.double().abs(), (0, kp - k)).view(m, kp // gs, gs).amax(-1)
    half_step = (amax / 32767 / 2).repeat_interleave(gs, dim=1)[:, :k]
    bound = 1.01 * half_step @ ref_w.abs().t() + 1e-5 * (x.double().abs() @ ref_w.abs().t()) + 1e-6
    err = (y.double() - ref).abs()
    assert y.shape == ref.shape and (err <= bound).all(), f"max error {err.max().item():.3g}"


# ------------------------------------------------------------------------------------------------
# int4
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", SMOLLM2_SHAPES)
@pytest.mark.parametrize("gs", (32, 64, 128))
@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("m", M_VALUES)
def test_int4_smollm2_shapes(n, k, gs, sym, m):
    packed, s, z, ref_w = int4_weight(n, k, gs, sym)
    if sym:  # min = -8 * scale exactly
        assert torch.equal(z, -8 * s)
    x = activations(m, k)
    assert_matches(cpu.int4_linear(x, packed, s, z, gs, k), x, ref_w)


@pytest.mark.parametrize("path", ("gemv", "tiled"))
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("n,k,gs,sym", [
    (960, 576, 32, False), (576, 1536, 128, True),
    (37, 100, 32, False),   # K padded to 128, N not a multiple of the 4-row blocks
    (41, 200, 128, True),   # K padded to 256 (one partial group of 72 columns)
    (5, 70, 64, False),     # K padded to 128
    (3, 16, 16, False),     # tiny: one 16-column group
    (130, 48, 16, True),    # group 16 (3 groups)
    (9, 40, 8, False),      # group 8: no GEMV for it, the tiled path is taken either way
    (17, 30, 10, True),     # group 10 (odd half-group): likewise
])
def test_int4_forced_paths_and_odd_shapes(n, k, gs, sym, m, path):
    packed, s, z, ref_w = int4_weight(n, k, gs, sym, seed=2)
    x = activations(m, k, seed=3)
    assert_matches(cpu.int4_linear(x, packed, s, z, gs, k, path=PATHS[path]), x, ref_w)


@pytest.mark.parametrize("path", tuple(I16_PATHS))
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("n,k,gs,sym", [
    (960, 576, 32, False), (3072, 576, 64, True), (576, 1536, 128, False),
    (37, 100, 32, False), (41, 200, 128, True), (5, 70, 64, False),
    (130, 48, 16, True),  # group 16: no int16 GEMV for it, the float kernels are used
])
def test_int4_int16_activation_path(n, k, gs, sym, m, path):
    packed, s, z, ref_w = int4_weight(n, k, gs, sym, seed=7)
    x = activations(m, k, seed=8)
    x[:, 0] *= 50  # an outlier channel: only its own group's rounding step grows
    assert_matches_i16(cpu.int4_linear(x, packed, s, z, gs, k, path=I16_PATHS[path]), x, ref_w, gs)


def test_int4_float16_extremes():
    """Subnormal, tiny and large float16 scales / mins are widened exactly (F16C), on every path."""
    n, k, gs = 16, 96, 32
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = rtn.pack_int4(codes)
    scales = torch.tensor([2.0**-24, 3 * 2.0**-20, 6.1e-5, 1e-3, 0.5, 1.0, 7.0, 300.0] * 2).repeat(3, 1).t()
    mins = -scales * torch.tensor([0.0, 7.5, 15.0]).repeat(n, 1)
    scales, mins = scales.contiguous().half(), mins.contiguous().half()
    ref_w = ref_int4(packed, scales, mins, k)
    x = activations(5, k)
    for path in PATHS.values():
        assert_matches(cpu.int4_linear(x, packed, scales, mins, gs, k, path=path), x, ref_w)
        assert_matches(cpu.int4_linear(x[:1], packed, scales, mins, gs, k, path=path), x[:1], ref_w)
    assert_matches_i16(cpu.int4_linear(x, packed, scales, mins, gs, k, path=cpu.PATH_GEMV_I16), x, ref_w, gs)


def test_int4_padding_codes_are_ignored():
    """Only the in_features columns of x exist: the padding codes (whatever they hold) add nothing."""
    n, k, gs = 8, 40, 32
    packed, s, z, ref_w = int4_weight(n, k, gs, False, seed=4)
    codes = rtn.unpack_int4(packed).clone()
    codes[:, k:] = 15  # not equal to the zero point: would matter if the padding met nonzero x
    junk = rtn.pack_int4(codes)
    x = activations(3, k)
    for path in PATHS.values():
        assert_matches(cpu.int4_linear(x, junk, s, z, gs, k, path=path), x, ref_w)
    assert_matches_i16(cpu.int4_linear(x, junk, s, z, gs, k, path=cpu.PATH_GEMV_I16), x, ref_w, gs)


def test_int4_extreme_codes_and_zeros():
    """All-0 / all-15 codes with zero points 0 and 15 (largest |code - zero|)."""
    n, k, gs = 12, 64, 32
    codes = torch.zeros(n, k, dtype=torch.uint8)
    codes[::2] = 15
    zeros = torch.zeros(n, k // gs, dtype=torch.uint8)
    zeros[1::2] = 15
    scales, zeros = rtn.int4_resident(torch.rand(n, k // gs) + 0.5, zeros)
    packed = rtn.pack_int4(codes)
    ref_w = ref_int4(packed, scales, zeros, k)
    x = activations(5, k)
    for path in PATHS.values():
        assert_matches(cpu.int4_linear(x, packed, scales, zeros, gs, k, path=path), x, ref_w)
    assert_matches_i16(cpu.int4_linear(x, packed, scales, zeros, gs, k, path=cpu.PATH_GEMV_I16), x, ref_w, gs)


# ------------------------------------------------------------------------------------------------
# int8
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,m", [(n, k, m) for n, k in SMOLLM2_SHAPES for m in M_VALUES]
                         + [(49152, 576, m) for m in M_VALUES if m != 130])  # the LM head: M=64 is enough
def test_int8_smollm2_shapes(n, k, m):
    q, s, ref_w = int8_weight(n, k)
    x = activations(m, k)
    assert_matches(cpu.int8_linear(x, q, s), x, ref_w)


@pytest.mark.parametrize("m", (4, 5, 6, 8, 9, 12))
@pytest.mark.parametrize("n,k", [(960, 576), (37, 100), (5, 7), (11, 33)])
def test_int8_gemv_batch_widths(n, k, m):
    """5..8 activation rows take the one-pass kernel, others passes of up to 4."""
    q, s, ref_w = int8_weight(n, k, seed=3)
    x = activations(m, k, seed=4)
    assert_matches(cpu.int8_linear(x, q, s, path=cpu.PATH_GEMV), x, ref_w)


@pytest.mark.parametrize("path", ("gemv", "tiled"))
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("n,k", [(960, 576), (37, 100), (5, 7), (3, 24), (130, 1), (11, 33)])
def test_int8_forced_paths_and_odd_shapes(n, k, m, path):
    q, s, ref_w = int8_weight(n, k, seed=5)
    x = activations(m, k, seed=6)
    assert_matches(cpu.int8_linear(x, q, s, path=PATHS[path]), x, ref_w)


@pytest.mark.parametrize("path", tuple(I16_PATHS))
@pytest.mark.parametrize("n,k,m", [(n, k, m) for n, k in [(960, 576), (37, 100), (5, 7), (11, 33), (9, 4100)]
                                   for m in (1, 2, 3, 4, 5, 8, 9, 12, 13, 64)]
                         + [(49152, 576, 1), (49152, 576, 8), (3072, 576, 130), (576, 1536, 70), (16, 16, 20)])
def test_int8_int16_activation_gemv(n, k, m, path):
    """int16-rounded activations: the GEMV (path 3; auto up to 12 rows) rounds per row, within half a step
    per element of the exact result (K > 2048 flushes the integer sums on the way); the auto path's GEMM
    above 12 rows (prefill) rounds per 128 columns."""
    q, s, ref_w = int8_weight(n, k, seed=7)
    x = activations(m, k, seed=8)
    x[0, k // 2] = 40.0  # an outlier: the other columns of row 0 (or of its group) get coarser steps
    y = cpu.int8_linear(x, q, s, path=I16_PATHS[path])
    assert_matches_i16(y, x, ref_w, 128 if path == "auto_i16" and m > 12 else k)


@pytest.mark.parametrize("m", (13, 70))
def test_int8_int16_gemm_rows_do_not_depend_on_the_batch(threads, m):
    q, s, _ = int8_weight(3072, 576, seed=12)
    x = activations(m, 576, seed=13)
    want = cpu.int8_linear(x, q, s, path=cpu.PATH_AUTO_I16)
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        assert torch.equal(cpu.int8_linear(x, q, s, path=cpu.PATH_AUTO_I16), want)
        assert torch.equal(cpu.int8_linear(torch.cat([x, x[:7]]), q, s, path=cpu.PATH_AUTO_I16)[:m], want)


def test_int8_int16_gemv_rows_do_not_depend_on_the_batch():
    """Exact integer sums: a row's output is bit-identical alone or with 1..11 others."""
    q, s, _ = int8_weight(960, 576, seed=9)
    x = activations(12, 576, seed=10)
    alone = torch.cat([cpu.int8_linear(x[i:i + 1], q, s, path=cpu.PATH_GEMV_I16) for i in range(12)])
    for m in (2, 5, 8, 12):
        assert torch.equal(cpu.int8_linear(x[:m], q, s, path=cpu.PATH_GEMV_I16), alone[:m])


def test_int8_int16_gemv_extremes():
    """Full-scale int8 weights against full-scale activations over 8192 columns (integer sums near their
    bounds), zero rows, and a row of one huge value."""
    k = 8192
    q = torch.full((4, k), 127, dtype=torch.int8)
    q[1] = -127
    q[2, ::2] = -128
    s = torch.full((4,), 0.01)
    x = torch.full((3, k), 3.0)
    x[1] = 0.0
    x[2] = -3.0
    x[2, 5] = 1e30
    y = cpu.int8_linear(x, q, s, path=cpu.PATH_GEMV_I16).double()
    ref = x.double() @ (q.double() * 0.01).t()
    torch.testing.assert_close(y[:2], ref[:2], rtol=1e-5, atol=1e-3)
    assert torch.isfinite(y).all() and torch.equal(y[1], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(y[2], ref[2], rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------------
# int4, rows interleaved by 8 (r8): exact tiles and the int8-activation decode GEMV
# ------------------------------------------------------------------------------------------------
def r8_weight(n: int, k: int, gs: int, sym: bool, seed: int = 0):
    packed, s, z, ref_w = int4_weight(n, k, gs, sym, seed)
    return (*rtn.interleave_rows8(packed, s, z), ref_w)


@pytest.mark.parametrize("n,k,gs", [(1, 32, 32), (13, 100, 32), (16, 256, 64), (37, 200, 128), (960, 576, 32)])
def test_interleave_rows8_round_trip(n, k, gs):
    packed, s, z, _ = int4_weight(n, k, gs, False)
    pi, si, zi = rtn.interleave_rows8(packed, s, z)
    n8 = (n + 7) // 8 * 8
    assert pi.shape == (n8, packed.shape[1]) and si.shape == zi.shape == (n8, s.shape[1])
    back = rtn.deinterleave_rows8(pi, si, zi, n)
    for a, b in zip(back, (packed, s, z)):
        assert torch.equal(a, b)
    # byte 4r+p of the first 32 bytes: code (r, p) low, code (r, 4+p) high
    codes = rtn.unpack_int4(packed)
    for r in range(min(n, 8)):
        for p in range(4):
            byte = int(pi.view(-1)[4 * r + p])
            assert byte & 15 == int(codes[r, p]) and byte >> 4 == int(codes[r, 4 + p])


R8_CASES = [(960, 576, 32, False), (3072, 576, 64, True), (576, 1536, 128, False), (13, 100, 32, False),
            (41, 200, 128, True), (5, 70, 64, False), (8, 32, 32, True)]


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("n,k,gs,sym", R8_CASES)
def test_int4r8_exact_path(n, k, gs, sym, m):
    pi, si, zi, ref_w = r8_weight(n, k, gs, sym, seed=4)
    x = activations(m, k, seed=5)
    assert_matches(cpu.int4r8_linear(x, pi, si, zi, n, gs, k, cpu.R8_EXACT), x, ref_w)


@pytest.mark.parametrize("m", (1, 2, 5, 6, 7, 13, 20))
@pytest.mark.parametrize("n,k,gs,sym", R8_CASES)
def test_int4r8_exact_small_kernel(n, k, gs, sym, m):
    """The small-M float kernel (what R8_EXACT runs up to 16 rows) forced at any M: float64 reference."""
    pi, si, zi, ref_w = r8_weight(n, k, gs, sym, seed=7)
    x = activations(m, k, seed=8)
    assert_matches(cpu.int4r8_linear(x, pi, si, zi, n, gs, k, cpu.R8_EXACT_SMALL), x, ref_w)


@pytest.mark.parametrize("m", (1, 2, 3, 4, 5, 8, 13))
@pytest.mark.parametrize("n,k,gs,sym", R8_CASES)
def test_int4r8_q8_path_equals_its_reference(n, k, gs, sym, m):
    """The decode GEMV == float64 matmul on the activations rounded by ``rtn.round_activations_q8``
    (integer sums are exact: only float32 rounding of the per-block scaling remains); and within the
    rounding's own error bound of the float result."""
    pi, si, zi, ref_w = r8_weight(n, k, gs, sym, seed=6)
    x = activations(m, k, seed=9)
    x[:, 0] *= 50  # an outlier channel: only its own 32-column block's step grows
    y = cpu.int4r8_linear(x, pi, si, zi, n, gs, k, cpu.R8_Q8)
    assert_matches(y, rtn.round_activations_q8(x), ref_w)
    kp = rtn.padded_in_features(k, 32)
    amax = torch.nn.functional.pad(x.double().abs(), (0, kp - k)).view(m, kp // 32, 32).amax(-1)
    half_step = (amax / 127 / 2).repeat_interleave(32, dim=1)[:, :k]
    bound = 1.01 * half_step @ ref_w.abs().t() + 1e-5 * (x.double().abs() @ ref_w.abs().t()) + 1e-6
    assert ((y.double() - x.double() @ ref_w.t()).abs() <= bound).all()


@pytest.mark.parametrize("m", (1, 2, 5, 6, 7, 13, 64, 130))
@pytest.mark.parametrize("n,k,gs,sym", R8_CASES + [(24, 64, 32, False)])
def test_int4r8_i16_path(n, k, gs, sym, m):
    """The prefill GEMM on int16 activations (one step per row and weight group): within half a step per
    element of the exact result. Row blocks come in pairs (an odd count leaves half a panel empty)."""
    pi, si, zi, ref_w = r8_weight(n, k, gs, sym, seed=10)
    x = activations(m, k, seed=11)
    x[:, 1] *= 30  # an outlier channel: only its own group's step grows
    assert_matches_i16(cpu.int4r8_linear(x, pi, si, zi, n, gs, k, cpu.R8_I16), x, ref_w, gs)


@pytest.mark.parametrize("path,rows,ms", [(cpu.R8_Q8, 11, (2, 4, 5, 11)), (cpu.R8_EXACT, 16, (2, 6, 7, 13, 16)),
                                          (cpu.R8_I16, 70, (2, 6, 7, 13, 16, 70))])
def test_int4r8_rows_do_not_depend_on_the_batch(threads, path, rows, ms):
    """Each row's result is the same alone or among others, on any thread count: batched decode (Q8) gives
    the tokens single-sequence decode gives, and a prompt prefilled in a group (EXACT up to 16 rows: the
    small-M kernel; I16 at any size) gives what it gives alone."""
    n, k, gs = 3072, 576, 32
    pi, si, zi, _ = r8_weight(n, k, gs, False)
    x = activations(rows, k)
    want = torch.cat([cpu.int4r8_linear(x[i:i + 1], pi, si, zi, n, gs, k, path) for i in range(rows)])
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        for m in ms:
            assert torch.equal(cpu.int4r8_linear(x[:m], pi, si, zi, n, gs, k, path), want[:m])
        x70 = activations(70, k)
        assert torch.equal(cpu.int4r8_linear(x70, pi, si, zi, n, gs, k, cpu.R8_EXACT),
                           cpu.int4r8_linear(x70, pi, si, zi, n, gs, k, cpu.R8_EXACT))


def test_int4r8_bad_arguments_raise():
    pi, si, zi, _ = r8_weight(13, 64, 32, False)
    x = activations(2, 64)
    ops = cpu.load()
    with pytest.raises(RuntimeError, match="out_features"):
        cpu.int4r8_linear(x, pi, si, zi, 17, 32, 64)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        cpu.int4r8_linear(x, pi[:13], si[:13], zi[:13], 13, 32, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu.int4r8_linear(x, *rtn.interleave_rows8(*int4_weight(8, 64, 16, False)[:3]), 8, 16, 64)
    with pytest.raises(RuntimeError, match="unknown path"):
        cpu.int4r8_linear(x, pi, si, zi, 13, 32, 64, 99)
    with pytest.raises((RuntimeError, ValueError)):
        cpu.int4r8_linear(activations(2, 60), pi, si, zi, 13, 32, 64)
    y = ops.int4r8_linear(torch.empty(5, 64, device="meta"), pi.to("meta"), si.to("meta"), zi.to("meta"), 13, 32, 64)
    assert y.shape == (5, 13) and y.device.type == "meta"


# ------------------------------------------------------------------------------------------------
# threads, layouts, dtypes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", (1, 3, 7, 64, 130))
def test_multithreaded_equals_single_threaded(m, threads):
    n, k = 3072, 576
    packed, s, z, _ = int4_weight(n, k, 32, False)
    q8, s8, _ = int8_weight(n, k)
    x = activations(m, k)
    out = {}
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        out[t] = [cpu.int4_linear(x, packed, s, z, 32, k, path=p) for p in (*PATHS.values(), *I16_PATHS.values())] + \
                 [cpu.int8_linear(x, q8, s8, path=p) for p in (*PATHS.values(), *I16_PATHS.values())]
    for t in (2, 3):
        for a, b in zip(out[1], out[t]):
            # each output is computed by one thread with the same summation order: bit-identical
            assert torch.equal(a, b)


def test_strided_and_batched_inputs():
    n, k, gs = 64, 100, 32
    packed, s, z, ref_w = int4_weight(n, k, gs, False)
    q8, s8, ref8 = int8_weight(n, k)
    wide = activations(6, k + 28)
    x_view = wide[:, 5:5 + k]  # rows with stride k + 28
    assert not x_view.is_contiguous()
    assert_matches(cpu.int4_linear(x_view, packed, s, z, gs, k), x_view, ref_w)
    assert_matches(cpu.int8_linear(x_view, q8, s8), x_view, ref8)
    x_t = activations(k, 5).t()  # column-major
    assert_matches(cpu.int4_linear(x_t, packed, s, z, gs, k), x_t, ref_w)
    x3 = activations(6, k).view(2, 3, k)
    y3 = cpu.int4_linear(x3, packed, s, z, gs, k)
    assert y3.shape == (2, 3, n)
    assert_matches(y3.view(6, n), x3.reshape(6, k), ref_w)
    assert cpu.int8_linear(x3, q8, s8).shape == (2, 3, n)
    empty = cpu.int4_linear(torch.zeros(0, k), packed, s, z, gs, k)
    assert empty.shape == (0, n)


def test_bfloat16_activations():
    n, k, gs = 96, 576, 64
    packed, s, z, ref_w = int4_weight(n, k, gs, True)
    q8, s8, ref8 = int8_weight(n, k)
    for m in (1, 64):
        x = activations(m, k).bfloat16()
        y4 = cpu.int4_linear(x, packed, s, z, gs, k)
        y8 = cpu.int8_linear(x, q8, s8)
        assert y4.dtype == torch.bfloat16 and y8.dtype == torch.bfloat16
        # computed in float32 from the bf16 values, rounded once to bf16 at the end
        torch.testing.assert_close(y4, (x.double() @ ref_w.t()).bfloat16(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y8, (x.double() @ ref8.t()).bfloat16(), rtol=1e-2, atol=1e-2)


def test_meta_tensors_give_shapes():
    """The ops have shape functions (needed to trace them, e.g. under torch.compile)."""
    ops = cpu.load()
    x = torch.empty(5, 100, device="meta")
    y = ops.int4_linear(x, torch.empty(7, 64, dtype=torch.uint8, device="meta"),
                        torch.empty(7, 4, dtype=torch.float16, device="meta"),
                        torch.empty(7, 4, dtype=torch.float16, device="meta"), 32, 100)
    assert y.shape == (5, 7) and y.device.type == "meta"
    y8 = ops.int8_linear(x, torch.empty(9, 100, dtype=torch.int8, device="meta"), torch.empty(9, device="meta"))
    assert y8.shape == (5, 9)


def test_bad_arguments_raise():
    packed, s, z, _ = int4_weight(8, 64, 32, False)
    x = activations(2, 64)
    with pytest.raises((RuntimeError, ValueError)):
        cpu.int4_linear(activations(2, 60), packed, s, z, 32, 64)  # wrong K
    with pytest.raises(RuntimeError):
        cpu.int4_linear(x, packed, s, z, 64, 64)  # group size inconsistent with scales
    with pytest.raises(TypeError, match="float16"):
        cpu.int4_linear(x, packed, s.float(), z.float(), 32, 64)  # the old float32 scales / zero points
    with pytest.raises(RuntimeError):
        cpu.load().int4_linear(x, packed, s.float(), z, 32, 64)
    with pytest.raises(RuntimeError):
        cpu.int4_linear(x, packed, s, z[:4], 32, 64)
    with pytest.raises(RuntimeError):
        cpu.int4_linear(x, packed.t().contiguous().t(), s, z, 32, 64)  # non-contiguous codes
    with pytest.raises(RuntimeError):
        cpu.int4_linear(x, packed, s, z, 32, 64, path=max(defs.Path) + 1)  # no such path
    q8, s8, _ = int8_weight(8, 64)
    with pytest.raises(RuntimeError):
        cpu.int8_linear(x, q8.to(torch.uint8), s8)
    with pytest.raises(RuntimeError):
        cpu.int8_linear(x, q8, s8[:4])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_one_openmp_runtime():
    """Our library shares torch's OpenMP runtime (one thread pool, no oversubscription)."""
    cpu.load()
    maps = Path("/proc/self/maps").read_text().splitlines()
    gomp = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(gomp) <= 1, gomp


# ------------------------------------------------------------------------------------------------
# fallback: available() is False with a reason when the kernels cannot be built
# ------------------------------------------------------------------------------------------------
_PROBE = r"""
import json, os, sys
from quantchat.kernels import cpu
out = {}
for name, env in json.loads(sys.argv[1]).items():
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cpu._error = None  # a fresh attempt per scenario (nothing gets loaded in any of them)
    out[name] = [cpu.available(), cpu.unavailable_reason()]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
print(json.dumps(out))
"""


def test_unavailable_with_reason(tmp_path):
    """No compiler / a failing compiler / disabled: available() is False and the reason says why."""
    import json

    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    bad = tmp_path / "badcxx"
    bad.write_text("#!/bin/sh\necho 'simulated compiler error' >&2\nexit 1\n")
    bad.chmod(0o755)
    scenarios = {
        "no_compiler": {"PATH": str(empty_bin)},
        "bad_compiler": {"CXX": str(bad)},
        "disabled": {"QUANTCHAT_NO_KERNELS": "1"},
    }
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "QUANTCHAT_NO_KERNELS")}
    env["QUANTCHAT_KERNELS_DIR"] = str(tmp_path / "kernels")  # empty: nothing cached to load
    res = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(scenarios)], capture_output=True, text=True,
                         env=env, timeout=300, cwd=str(Path(__file__).resolve().parent.parent))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["no_compiler"][0] is False and "compiler" in out["no_compiler"][1]
    assert out["bad_compiler"][0] is False and "simulated compiler error" in out["bad_compiler"][1]
    assert out["disabled"][0] is False and "QUANTCHAT_NO_KERNELS" in out["disabled"][1]

