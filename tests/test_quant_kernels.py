"""Quantizers give the expected codes; packing round-trips; each kernel equals dequantize-then-matmul."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantchat.quant import rtn
from quantchat.quant.linear import QuantizedLinear


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), half_k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(n, half_k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, 2 * half_k), generator=g, dtype=torch.uint8)
    packed = rtn.pack_int4(codes)
    assert packed.shape == (n, half_k) and packed.dtype == torch.uint8
    assert torch.equal(rtn.unpack_int4(packed), codes)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), groups=st.integers(1, 4), gs=st.sampled_from([32, 64, 128]),
       extra=st.integers(0, 31), sym=st.booleans(), seed=st.integers(0, 2**16))
def test_int4_quantize_dequantize_error_bound(n, groups, gs, extra, sym, seed):
    """Any shape (K not a multiple of the group too): error <= half a step per group, codes in range."""
    g = torch.Generator().manual_seed(seed)
    k = groups * gs - (extra if groups * gs - extra > 0 else 0)
    w = torch.randn(n, k, generator=g, dtype=torch.float64).float()
    q, s, z = rtn.quantize_int4(w, gs, sym)
    assert q.shape == (n, rtn.padded_in_features(k, gs)) and int(q.max()) <= 15
    deq = rtn.dequantize_int4(q, s, z, k)
    step = s.repeat_interleave(gs, dim=1)[:, :k]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


def test_int4_symmetric_exact_codes():
    w = torch.tensor([[-7.0, -3.5, 0.0, 1.0, 3.5, 7.0, 2.0, -1.0]])
    q, s, z = rtn.quantize_int4(w, 8, symmetric=True)
    assert s.tolist() == [[1.0]] and z.tolist() == [[8]]
    assert (q.int() - 8).tolist() == [[-7, -4, 0, 1, 4, 7, 2, -1]]  # round half to even: -3.5 -> -4, 3.5 -> 4


def test_int4_asymmetric_exact_codes():
    w = torch.tensor([[0.0, 1.5, 3.0, 15.0, 7.5, 0.5, 14.0, 2.0]]) - 3.0  # min -3, max 12 -> scale 1, zero 3
    q, s, z = rtn.quantize_int4(w, 8, symmetric=False)
    assert s.tolist() == [[1.0]] and z.tolist() == [[3]]
    # w = [-3, -1.5, 0, 12, 4.5, -2.5, 11, -1]; code = round_half_even(w / 1 + 3)
    assert q.tolist() == [[0, 2, 3, 15, 8, 0, 14, 2]]


def test_int4_asymmetric_recovers_q4_1_grid():
    """Weights on a Q4_1 grid (w = d * q + m with float16 d and m, m not a multiple of d, as llama.cpp
    stores them) come back exactly, through the float16 resident form too."""
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(6, 4, 1, generator=g) * 0.1 + 0.01).half().float()
    m = (torch.randn(6, 4, 1, generator=g) * 0.3).half().float()
    q = torch.randint(0, 16, (6, 4, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15  # each group spans the full grid
    w = (d * q + m).view(6, 128)
    codes, s, z = rtn.quantize_int4(w, 32, symmetric=False)
    assert torch.equal(codes.view(6, 4, 32).long(), q)
    torch.testing.assert_close(rtn.dequantize_int4(codes, s, z), w, rtol=0, atol=1e-6)
    s16, m16 = rtn.int4_resident(s, z)
    assert torch.equal(s16.float(), d.view(6, 4)) and torch.equal(m16.float(), m.view(6, 4))
    assert torch.equal(rtn.dequantize_int4_resident(codes, s16, m16), w)  # bit-exact: d * q + m in float32


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), groups=st.integers(1, 4), gs=st.sampled_from([32, 64, 128]),
       sym=st.booleans(), integer_zero=st.booleans(), log_scale=st.floats(-12, 8), seed=st.integers(0, 2**16))
def test_int4_float16_resident_form(n, groups, gs, sym, integer_zero, log_scale, seed):
    """Scales (and asymmetric mins) are float16 values, so the float16 resident form loses nothing
    (integer zero points: the min rounds to float16, well under 1/100 of a step)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, groups * gs, generator=g) * 2.0**log_scale + torch.randn(n, 1, generator=g) * 2.0**log_scale
    q, s, z = rtn.quantize_int4(w, gs, sym, integer_zero=integer_zero)
    assert s.dtype == z.dtype == torch.float32
    assert torch.equal(s.half().float(), s) and (s > 0).all()
    s16, m16 = rtn.int4_resident(s, z)
    assert s16.dtype == m16.dtype == torch.float16
    assert torch.equal(s16.float(), s)
    a = rtn.dequantize_int4(q, s, z)
    b = rtn.dequantize_int4_resident(q, s16, m16)
    step = s.repeat_interleave(gs, dim=1)
    if sym:
        assert torch.equal(m16.float(), -8 * s)
    tol = step * (1e-2 if integer_zero and not sym else 1e-5)
    assert ((a - b).abs() <= tol).all()
    codes = {"qweight": rtn.pack_int4(q), "scales": s, "zeros": z}
    assert torch.equal(rtn.dequantize_codes(codes), b)
    assert torch.equal(rtn.dequantize_codes({"qweight": codes["qweight"], "scales": s16, "mins": m16}), b)


def test_int4_scale_out_of_float16_range():
    with pytest.raises(ValueError, match="float16"):
        rtn.quantize_int4(torch.tensor([[0.0, 1e6] * 16]), 32, symmetric=True)


def test_int8_exact_codes():
    w = torch.tensor([[127.0, -63.5, 1.0, 0.0], [0.5, -0.25, 0.0, 0.125]])
    q, s = rtn.quantize_int8(w)
    assert torch.allclose(s, torch.tensor([1.0, 0.5 / 127]))
    assert q.tolist() == [[127, -64, 1, 0], [127, -64, 0, 32]]


SHAPES = [(1, 64, 32), (3, 64, 48), (5, 576, 960), (1, 1536, 576), (7, 100, 80), (2, 576, 3072)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("fmt", ["int8", "int4-sym-32", "int4-asym-32", "int4-sym-64", "int4-asym-128"])
def test_kernel_matches_reference(m, k, n, fmt):
    if n % 16:
        pytest.skip("int4 kernels need out_features % 16 == 0")
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g) if m % 2 else None
    x = torch.randn(m, k, generator=g)
    if fmt == "int8":
        ql = QuantizedLinear.from_float(w, bias, bits=8, keep_codes=True)
    else:
        _, kind, gs = fmt.split("-")
        ql = QuantizedLinear.from_float(w, bias, bits=4, group_size=int(gs), symmetric=kind == "sym", keep_codes=True)
    got, want = ql(x), ql.reference_forward(x)
    assert got.shape == (m, n)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-5)
    # and the quantized layer approximates the float layer
    ref = torch.nn.functional.linear(x, w, bias)
    assert (got - ref).norm() / ref.norm() < (0.02 if fmt == "int8" else 0.2)


def test_kernel_3d_input_and_memory():
    w = torch.randn(1152, 1024)
    ql = QuantizedLinear.from_float(w, None, bits=4, group_size=128, symmetric=True)
    x = torch.randn(2, 3, 1024)
    assert ql(x).shape == (2, 3, 1152)
    assert ql.weight_bytes / w.numel() <= 0.6
    q8 = QuantizedLinear.from_float(w, None, bits=8)
    assert q8.weight_bytes / w.numel() <= 1.05


def test_resident_int4_is_float16_and_one_layout():
    """quantchat's kernels: packed codes + float16 scales / mins, nothing else; the reference reads the same."""
    w = torch.randn(96, 200) * 0.1
    ql = QuantizedLinear.from_float(w, None, bits=4, group_size=64, symmetric=False)
    if not ql.own_kernel:
        pytest.skip("quantchat CPU kernels unavailable")
    assert {k: (tuple(v.shape), v.dtype) for k, v in ql.state_dict().items()} == {
        "qweight": ((96, 128), torch.uint8), "scales": ((96, 4), torch.float16), "mins": ((96, 4), torch.float16)}
    assert ql.codes is None  # the quantizer's float32 dict is not kept
    assert ql.weight_bytes == 96 * 128 + 2 * 2 * 96 * 4
    x = torch.randn(3, 200)
    torch.testing.assert_close(ql(x), ql.reference_forward(x), rtol=1e-5, atol=1e-5)


@given(st.integers(1, 40), st.sampled_from([32, 64, 128]), st.integers(1, 4), st.integers(0, 31), st.integers(0, 99))
@settings(max_examples=30, deadline=None)
def test_interleave_rows8_round_trip_property(n, gs, groups, short, seed):
    """r8 layout (the fused decode step's): de-interleaving gives the resident codes back, any shape."""
    k = max(1, gs * groups - short)
    g = torch.Generator().manual_seed(seed)
    q, s, z = rtn.quantize_int4(torch.randn(n, k, generator=g), gs, bool(seed % 2))
    packed = rtn.pack_int4(q)
    s16, m16 = rtn.int4_resident(s, z)
    back = rtn.deinterleave_rows8(*rtn.interleave_rows8(packed, s16, m16), n)
    assert all(torch.equal(a, b) for a, b in zip(back, (packed, s16, m16)))


def test_quantized_linear_interleave_rows_in_place():
    """``interleave_rows_`` keeps the module's function (exact path), its portable codes and its memory."""
    from quantchat.kernels import cpu

    if not cpu.available():
        pytest.skip("quantchat's CPU kernels unavailable")
    torch.manual_seed(0)
    w, b = torch.randn(45, 100), torch.randn(45)
    lin = QuantizedLinear.from_float(w, b, 4, 32, symmetric=False)
    x = torch.randn(3, 100)
    before, codes = lin(x), {k: v.clone() for k, v in lin.resident_codes().items()}
    nbytes = lin.weight_bytes
    assert lin.interleave_rows_() and lin.r8 and lin.interleave_rows_()  # idempotent
    assert lin.qweight.shape[0] == 48 and lin.r8_path == cpu.R8_PREFILL  # prefill: int16 activations (AMX: bf16 x 3)
    # x rounded per 32 columns to absmax / 32767 steps: at most half a step x sum |w| (~5e-3) off
    torch.testing.assert_close(lin(x), before, rtol=0, atol=5e-3)
    lin.r8_path = cpu.R8_EXACT
    torch.testing.assert_close(lin(x), before, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, codes[k]) for k, a in lin.resident_codes().items())
    torch.testing.assert_close(lin.dequantized_weight(), rtn.dequantize_codes(codes, 100))
    assert lin.weight_bytes <= nbytes * 48 / 45 + 64  # only the padding rows are added
    lin.r8_path = cpu.R8_Q8
    torch.testing.assert_close(lin(x), lin.reference_forward(rtn.round_activations_q8(x)), rtol=1e-4, atol=1e-4)
    int8 = QuantizedLinear.from_float(w, None, 8)
    assert not int8.interleave_rows_() and not int8.r8


def test_int4_asymmetric_separate_min_max_clip():
    """clip [N, G, 2]: the min and the max shrink by their own factors; values outside are clamped."""
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0]])
    q, s, z = rtn.quantize_int4(w, 8, False, clip=torch.tensor([[[0.5, 1.0]]]))
    assert float(s[0, 0]) == pytest.approx(2.5 / 15, rel=1e-3)  # range [-0.5, 2]
    deq = rtn.dequantize_int4(q, s, z, 8)
    assert float(deq[0, 0]) == pytest.approx(-0.5, abs=1e-3)  # -1 clamped to the new min
    assert float(deq[0, 1]) == pytest.approx(-0.5, abs=1e-3)
    assert float(deq[0, -1]) == pytest.approx(2.0, abs=1e-3)
    same = rtn.quantize_int4(w, 8, False, clip=torch.tensor([[0.75]]))
    both = rtn.quantize_int4(w, 8, False, clip=torch.tensor([[[0.75, 0.75]]]))
    assert all(torch.equal(a, b) for a, b in zip(same, both))


@pytest.mark.parametrize("k, tiles", [(576, 4), (1536, 8), (4096, 8), (96, 2), (64, 4), (32, 2)])
def test_tinygemm_inner_k_tiles_divide_k(k, tiles):
    """torch's CUDA int4 packer needs K divisible by 16 * innerKTiles: gpt-fast's fixed 8 fails K = 576."""
    from quantchat.quant.linear import tinygemm_inner_k_tiles

    assert tinygemm_inner_k_tiles(k) == tiles and k % (16 * tiles) == 0


def test_tinygemm_inner_k_tiles_rejects_k_not_multiple_of_32():
    from quantchat.quant.linear import tinygemm_inner_k_tiles

    with pytest.raises(ValueError, match="multiple of 32"):
        tinygemm_inner_k_tiles(48)


@pytest.mark.parametrize("n, gs, groups", [(13, 32, 3), (8, 64, 2), (5, 128, 1), (16, 32, 18)])
def test_tinygemm_operands_give_the_same_weights(n, gs, groups):
    """The CUDA kernel's operands (nibble order, (code - 8) * scale + bias, rows padded to 8) dequantize
    to the resident weights exactly; padding rows are zero."""
    from quantchat.quant.linear import tinygemm_dequantize, tinygemm_operands

    g = torch.Generator().manual_seed(n * gs)
    w = torch.randn(n, gs * groups, generator=g)
    q, s, z = rtn.quantize_int4(w, gs, symmetric=False)
    s16, m16 = rtn.int4_resident(s, z)
    packed, sz, inner = tinygemm_operands(q, s16, m16)
    n8 = (n + 7) // 8 * 8
    assert packed.shape == (n8, gs * groups // 2) and packed.dtype == torch.uint8
    assert sz.shape == (groups, n8, 2) and inner in (2, 4, 8)
    deq = tinygemm_dequantize(packed, sz)
    ref = rtn.dequantize_int4_resident(q, s16, m16)
    torch.testing.assert_close(deq[:n], ref, rtol=0, atol=1e-6)
    assert torch.equal(deq[n:], torch.zeros(n8 - n, gs * groups))


def test_tinygemm_operands_reject_unsupported_group_size():
    from quantchat.quant.linear import tinygemm_operands

    q = torch.zeros(8, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="group sizes"):
        tinygemm_operands(q, torch.ones(8, 2, dtype=torch.float16), torch.zeros(8, 2, dtype=torch.float16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n, k, gs", [(13, 576, 32), (192, 576, 64), (64, 1536, 128)])
def test_int4_cuda_kernel_matches_reference(n, k, gs):
    """tinygemm on the GPU (bfloat16 activations) against dequantize-then-matmul."""
    g = torch.Generator().manual_seed(k + n)
    w, bias = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    ql = QuantizedLinear.from_float(w.cuda(), bias.cuda(), bits=4, group_size=gs, symmetric=False,
                                  keep_codes=True)
    x = torch.randn(5, k, generator=g).cuda()
    y, ref = ql(x), ql.reference_forward(x)
    assert y.shape == (5, n)
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int8_cuda_kernel_matches_reference():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 576, generator=g)
    ql = QuantizedLinear.from_float(w.cuda(), None, bits=8, keep_codes=True)
    x = torch.randn(3, 576, generator=g).cuda()
    torch.testing.assert_close(ql(x), ql.reference_forward(x), rtol=1e-3, atol=1e-3)


def test_kernels_build_where_they_can():
    """Where the CPU and a compiler allow it, quantchat's C++ kernels must build: a compile error fails here
    (test_cpu_kernels.py skips all its tests when they are unavailable)."""
    import os

    from quantchat.kernels import cpu

    try:
        cpu.select_variant()
        cpu._compiler()
    except cpu.KernelsUnavailable as e:
        pytest.skip(str(e))
    if os.environ.get("QUANTCHAT_NO_KERNELS"):
        pytest.skip("QUANTCHAT_NO_KERNELS is set")
    assert cpu.available(), cpu.unavailable_reason()
