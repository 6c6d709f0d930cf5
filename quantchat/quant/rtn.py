"""Round-to-nearest weight quantizers and the int4 packing: plain reference code, float64-safe.

Formats (device-independent; what checkpoints store):

* int8: symmetric per output channel. ``scale = absmax / 127``, codes in [-127, 127] (int8).
* int4 symmetric, per group of ``group_size`` input columns: ``scale = absmax / 7``, codes in [-7, 7]
  stored as ``code + 8`` in [1, 15]. Absmax/7 keeps the grid symmetric around zero, so no weight is
  clipped and -max..max maps exactly; llama.cpp's Q4_0 instead divides the signed extreme by -8,
  using the 16th level at the cost of an asymmetric grid. We keep absmax/7 (the AWQ/GPTQ
  symmetric convention) because AWQ's clip search then shrinks the range where it pays.
* int4 asymmetric, per group: ``scale = (max - min) / 15`` and a fractional zero point
  ``z = -min / scale``, codes ``round(w / scale + z)`` in [0, 15]; ``w ≈ (code - z) * scale``,
  i.e. ``code * scale + min``: the group's range is used exactly (no rounding of the zero point,
  no widening to include 0), the form of llama.cpp's Q4_1. GPTQ keeps integer zero points; they are
  stored the same way.

int4 scales and mins are float16 where they are kept (resident memory, checkpoints), as llama.cpp's
Q4_0/Q4_1 keep their d and m: the quantizers here round ``scale`` (and, asymmetric, ``min``) to
float16 first and pick the codes on that grid, so the float16 form loses nothing. What the kernels
read (``int4_resident``) is ``scales`` float16 [N, G] and ``mins`` float16 [N, G] with
``w = code * scale + min`` (``min = -zero * scale``: the value of code 0; for symmetric it is
exactly ``-8 * scale``). ``quantize_int4`` still returns float32 tensors (float16 values) with zero
points, which ``int4_resident`` turns into that form without loss (integer GPTQ zero points: ``min =
-z * scale`` rounds to float16, at most 15 * 2^-11 = 0.7 % of a step). Dequantize any codes dict with
``dequantize_codes``. Float16 rather than bfloat16: 11 significant bits against 8 (scale errors 8x
smaller) and Q4_1's d/m are float16 already; the range (6e-8 .. 65504) covers weights.

When in_features is not a multiple of the group size the weight is zero-padded on the right to
the next multiple (the padding quantizes to exact zeros and meets zero-padded activations).

int4 codes are packed two per byte along the input dimension: byte j holds column 2j in its low
nibble and column 2j+1 in its high nibble.
"""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_int8(w: Tensor, chunk_rows: int = 4096) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: returns (codes int8 [N, K], scales float32 [N]). Rows are done
    ``chunk_rows`` at a time (the same result): a 49k-row LM head needs no float temporaries its size."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], chunk_rows):
        c = w[i:i + chunk_rows].float()
        s = (c.abs().amax(dim=1) / 127).clamp(min=1e-10)
        q[i:i + chunk_rows] = torch.round(c / s[:, None]).clamp(-127, 127).to(torch.int8)
        scale[i:i + chunk_rows] = s
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale[:, None]


def padded_in_features(k: int, group_size: int) -> int:
    return (k + group_size - 1) // group_size * group_size


def pad_columns(w: Tensor, k_padded: int) -> Tensor:
    return w if w.shape[1] == k_padded else torch.nn.functional.pad(w, (0, k_padded - w.shape[1]))


FP16_TINY = 2.0**-24  # the smallest positive float16 (subnormal): the floor of a scale


def to_fp16_values(t: Tensor, what: str = "int4 scale") -> Tensor:
    """``t`` rounded to float16 values, returned as float32; ValueError when out of float16's range."""
    h = t.float().half()
    if not torch.isfinite(h).all():
        big = float(t.float().abs().max())
        raise ValueError(f"{what} {big:.4g} is out of float16 range (max 65504): weights this large cannot "
                         "be int4-quantized with float16 scales")
    return h.float()


def quantize_int4(
    w: Tensor, group_size: int, symmetric: bool, clip: Tensor | None = None, integer_zero: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise int4. Returns (codes uint8 [N, Kp] in 0..15, scales float32 [N, G], zeros float32 [N, G]).

    The scales (and asymmetric, the mins ``-zero * scale``) are float16 values: see ``int4_resident``.

    ``clip`` (optional) comes from a clipping search; values outside the shrunk range are clamped.
    Symmetric: [N, G], a per-group max magnitude. Asymmetric: [N, G], one shrink factor applied to the
    group's min and max, or [N, G, 2], separate factors for the min and the max (AWQ's search).
    ``integer_zero`` (asymmetric): the classic GPTQ/AWQ grid instead, whose range includes 0 and
    whose zero point is rounded to an integer (still returned as float32).
    """
    N, K = w.shape
    Kp = padded_in_features(K, group_size)
    wg = pad_columns(w.float(), Kp).view(N, Kp // group_size, group_size)
    if symmetric:
        amax = wg.abs().amax(dim=-1)
        if clip is not None:
            amax = torch.minimum(amax, clip)
        scale = to_fp16_values((amax / 7).clamp(min=FP16_TINY))
        q = torch.round(wg / scale[..., None]).clamp(-7, 7) + 8
        zeros = torch.full_like(scale, 8.0)
    else:
        mn, mx = wg.amin(dim=-1), wg.amax(dim=-1)
        if integer_zero:
            mn, mx = mn.clamp(max=0), mx.clamp(min=0)
        if clip is not None:
            if clip.dim() == 3:
                mn, mx = mn * clip[..., 0], mx * clip[..., 1]
            else:
                mn, mx = mn * clip, mx * clip
        scale = to_fp16_values(((mx - mn) / 15).clamp(min=FP16_TINY))
        if integer_zero:
            zeros = torch.round(-mn / scale).clamp(0, 15)
        else:  # -zeros * scale == min (a float16 value) to float32 rounding: int4_resident gets it back
            zeros = -to_fp16_values(mn, "int4 group minimum") / scale
        q = torch.round(wg / scale[..., None] + zeros[..., None]).clamp(0, 15)
    return q.to(torch.uint8).view(N, Kp), scale, zeros.float()


def dequantize_int4(codes: Tensor, scales: Tensor, zeros: Tensor, in_features: int | None = None) -> Tensor:
    """Float32 weight [N, K] from unpacked codes [N, Kp], scales and zero points (any float dtype)."""
    N, Kp = codes.shape
    G = scales.shape[1]
    gs = Kp // G
    w = (codes.float().view(N, G, gs) - zeros.float()[..., None]) * scales.float()[..., None]
    w = w.view(N, Kp)
    return w if in_features is None else w[:, :in_features]


def int4_resident(scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    """(scales, zero points) -> (scales float16 [N, G], mins float16 [N, G]): what the kernels read and
    checkpoints store, ``w = code * scale + min``. Lossless for ``quantize_int4``'s output."""
    s = scales.float()
    return to_fp16_values(s).half(), to_fp16_values(-zeros.float() * s, "int4 group minimum").half()


def dequantize_int4_resident(codes: Tensor, scales: Tensor, mins: Tensor, in_features: int | None = None) -> Tensor:
    """Float32 weight [N, K] from unpacked codes [N, Kp] and float16 scales / mins: ``code * scale + min``
    (the reference the kernels are tested against)."""
    N, Kp = codes.shape
    G = scales.shape[1]
    gs = Kp // G
    w = codes.float().view(N, G, gs) * scales.float()[..., None] + mins.float()[..., None]
    w = w.view(N, Kp)
    return w if in_features is None else w[:, :in_features]


def dequantize_codes(codes: dict[str, Tensor], in_features: int | None = None) -> Tensor:
    """Float32 weight [N, K] from any codes dict: int8 ``{qweight int8, scales}``, int4 ``{qweight packed uint8,
    scales, zeros}`` (the quantizers' output, checkpoint format 1) or ``{qweight, scales, mins}`` (resident
    form, checkpoint format 2). int4 goes through the float16 resident form: the weights the kernels use."""
    q = codes["qweight"]
    if q.dtype == torch.int8:
        w = dequantize_int8(q, codes["scales"].float())
        return w if in_features is None else w[:, :in_features]
    if "mins" in codes:
        s, m = codes["scales"], codes["mins"]
    else:
        s, m = int4_resident(codes["scales"], codes["zeros"])
    return dequantize_int4_resident(unpack_int4(q), s, m, in_features)


def pack_int4(codes: Tensor) -> Tensor:
    """[N, K] uint8 codes in 0..15 (K even) -> [N, K/2] bytes: low nibble = even column."""
    if codes.shape[-1] % 2:
        raise ValueError("int4 packing needs an even number of columns")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of ``pack_int4``."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).view(*packed.shape[:-1], packed.shape[-1] * 2)


def interleave_rows8(packed: Tensor, scales: Tensor, mins: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Resident int4 ``(qweight [N, Kp/2], scales [N, G], mins [N, G])`` -> the decode kernel's "r8" layout:
    rows zero-padded to N8 (a multiple of 8) and interleaved in blocks of 8. Per block b, group g and 8
    columns c of the group, 32 bytes: byte 4r+p holds code[8b+r, g*gs+8c+p] (low nibble) and
    code[8b+r, g*gs+8c+4+p] (high nibble). scales / mins [N8, G] hold each block as [G, 8].
    Needs group_size % 8 == 0. Inverse: ``deinterleave_rows8``."""
    codes = unpack_int4(packed)
    N, Kp = codes.shape
    G = scales.shape[1]
    gs = Kp // G
    if gs % 8:
        raise ValueError(f"row interleaving needs a group size that is a multiple of 8 (got {gs})")
    n8 = (N + 7) // 8 * 8
    pad = n8 - N
    if pad:
        codes = torch.nn.functional.pad(codes, (0, 0, 0, pad))
        scales, mins = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (scales, mins))
    c = codes.view(n8 // 8, 8, G, gs // 8, 2, 4).permute(0, 2, 3, 1, 5, 4)  # [b, g, c, r, p, half]
    out = (c[..., 0] | (c[..., 1] << 4)).reshape(n8, Kp // 2)
    def blocks(t: Tensor) -> Tensor:
        return t.reshape(n8 // 8, 8, G).transpose(1, 2).reshape(n8, G).contiguous()
    return out.contiguous(), blocks(scales), blocks(mins)


def deinterleave_rows8(packed: Tensor, scales: Tensor, mins: Tensor, out_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``interleave_rows8``: the resident layout of the first ``out_features`` rows."""
    n8, half_kp = packed.shape
    G = scales.shape[1]
    gs = half_kp * 2 // G
    b = packed.reshape(n8 // 8, G, gs // 8, 8, 4)  # [b, g, c, r, p]
    c = torch.stack([b & 0x0F, b >> 4], dim=-1)  # [b, g, c, r, p, half]
    codes = c.permute(0, 3, 1, 2, 5, 4).reshape(n8, half_kp * 2)[:out_features]
    def rows(t: Tensor) -> Tensor:
        return t.reshape(n8 // 8, G, 8).transpose(1, 2).reshape(n8, G)[:out_features].contiguous()
    return pack_int4(codes).contiguous(), rows(scales), rows(mins)


def round_activations_q8(x: Tensor, block: int = 32) -> Tensor:
    """Plain reference of the decode kernel's activation rounding (``cpu.R8_Q8``): per row and ``block``
    columns, ``dx = absmax / 127`` and ``x ~= round(x / dx) * dx`` (ties to even), as llama.cpp's Q8_0.
    Returns the rounded x (same shape and dtype, float64 math)."""
    m, k = x.shape
    kp = padded_in_features(k, block)
    xb = torch.nn.functional.pad(x.double(), (0, kp - k)).view(m, kp // block, block)
    dx = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(dx > 0, torch.round(xb / dx.clamp(min=1e-300)), torch.zeros_like(xb))
    return (q * dx).view(m, kp)[:, :k].to(x.dtype)
