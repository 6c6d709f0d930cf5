"""``QuantizedLinear``: a weight-only quantized replacement for ``nn.Linear`` (module swap).

The weights stay packed in memory and run through torch's low-bit kernels:

* CPU with AVX2 (the usual case): quantchat's own C++ kernels (``quantchat.kernels.cpu``), which read
  the packed codes as stored (no repacking; the fused decode step re-lays int4 rows in blocks of 8 with
  ``interleave_rows_``) and beat float32; torch's weight-only CPU kernels
  are slower than float32 on AVX2-only CPUs and serve as the fallback when ours cannot be built.
  Buffers: int4 ``qweight`` uint8 [N, Kp/2], ``scales`` and ``mins`` float16 [N, G]
  (``w = code * scale + min``, see ``rtn.int4_resident``): 0.5 + 4 / group_size bytes per weight
  (plus the zero padding of K to a multiple of the group); int8 ``qweight`` int8 [N, K] and
  ``scales`` float32 [N] (``weight_int8`` is the same tensor, for the tied embedding).
* int8 (per-channel): ``torch._weight_int8pack_mm`` (CPU fallback and CUDA), codes int8 [N, K] as stored.
* int4 (group-wise, symmetric or asymmetric): on CPU ``torch._weight_int4pack_mm_for_cpu`` over the
  layout made by ``_convert_weight_to_int4pack_for_cpu``; on CUDA the tinygemm kernel
  ``torch._weight_int4pack_mm`` (bfloat16 activations). Both compute ``(code - 8) * scale + bias``
  per group, so the bias is ``8 * scale + min``. On CPU the float16 scales and mins are what stays
  resident and the op's [G, N, 2] table (in x's dtype) is made per call; CUDA keeps it in bfloat16.

``reference_forward`` is the plain dequantize-then-matmul path the kernels are tested against (from
the resident float16 scales: the same weights the kernels use). ``from_codes`` takes the quantizers'
codes dicts (``{qweight, scales, zeros}``, float32) or the resident form (``{qweight, scales, mins}``,
float16, as checkpoint format 2 stores it); the caller's dict is kept only with ``keep_codes``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantchat import envs
from quantchat.kernels import cpu
from quantchat.kernels.defs import Path, R8Path
from quantchat.quant import rtn


def use_own_cpu_kernels() -> bool:
    """quantchat's AVX2 kernels are built and loadable (``QUANTCHAT_NO_KERNELS=1`` turns them off)."""
    return cpu.available()

METHODS_BITS = {"int8": 8, "int4": 4}
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)


def tinygemm_inner_k_tiles(k_padded: int) -> int:
    """``innerKTiles`` for torch's CUDA int4 kernel (tinygemm): the largest of 8, 4, 2 whose 16-column
    k-tiles divide K evenly (torch checks it: K = 576, as in SmolLM2, takes 4, not gpt-fast's fixed 8)."""
    for t in (8, 4, 2):
        if k_padded % (16 * t) == 0:
            return t
    raise ValueError(f"the CUDA int4 kernel needs K to be a multiple of 32 (got {k_padded})")


def int4pack_scales_and_zeros(scales: Tensor, mins: Tensor) -> Tensor:
    """torch's int4 kernels' [G, N, 2] table of (scale, bias) from scales / mins [N, G] (float32): they
    compute ``(code - 8) * scale + bias``, and ``code * s + m == (code - 8) * s + (8 * s + m)``."""
    s, m = scales.float(), mins.float()
    return torch.stack([s.t(), (8 * s + m).t()], dim=-1).contiguous()


def tinygemm_operands(q: Tensor, scales: Tensor, mins: Tensor) -> tuple[Tensor, Tensor, int]:
    """The CUDA int4 kernel's inputs from unpacked codes [N, Kp] (0..15) and float16 scales / mins [N, G]:
    (uint8 [N8, Kp/2] with the even column in the high nibble, as ``_convert_weight_to_int4pack`` takes
    it; float32 [G, N8, 2] of (scale, bias) with bias = 8 * scale + min, since tinygemm computes
    ``(code - 8) * scale + bias``; innerKTiles). Rows are zero-padded to N8, a multiple of the kernel's
    8-row tile (the padding's outputs are 0 and are sliced off). ``tinygemm_dequantize`` inverts it."""
    N, Kp = q.shape
    if scales.shape[0] != N or Kp % scales.shape[1]:
        raise ValueError("codes and scales disagree")
    gs = Kp // scales.shape[1]
    if gs not in TINYGEMM_GROUP_SIZES:
        raise ValueError(f"the CUDA int4 kernel takes group sizes {TINYGEMM_GROUP_SIZES}, not {gs}")
    inner = tinygemm_inner_k_tiles(Kp)
    pad = (N + 7) // 8 * 8 - N
    q8 = q.to(torch.uint8)
    sz = int4pack_scales_and_zeros(scales, mins)
    if pad:  # code 8 with scale 0 and bias 0: weight 0
        q8 = F.pad(q8, (0, 0, 0, pad), value=8)
        sz = F.pad(sz, (0, 0, 0, pad))
    packed = (q8[:, 0::2] << 4 | q8[:, 1::2]).to(torch.uint8).contiguous()
    return packed, sz, inner


def tinygemm_dequantize(packed: Tensor, sz: Tensor) -> Tensor:
    """Float32 [N8, Kp] weight that tinygemm computes with from ``tinygemm_operands``' output (reference)."""
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1).float()
    G = sz.shape[0]
    w = codes.view(codes.shape[0], G, -1) - 8
    return (w * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).reshape(codes.shape)


def resident_int4(codes: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(scales, mins) float16 from an int4 codes dict, either form (no copy when already float16)."""
    if "mins" in codes:
        return codes["scales"].to(torch.float16), codes["mins"].to(torch.float16)
    return rtn.int4_resident(codes["scales"], codes["zeros"])


def module_tensor_bytes(module: nn.Module) -> dict[str, int]:
    """{name: bytes} of every tensor a module holds directly: buffers, parameters, tensor attributes and
    kept codes, each storage counted once (aliases such as ``weight_int8`` are not counted twice)."""
    seen: dict[tuple[int, int], str] = {}
    out: dict[str, int] = {}
    items = [*module.named_buffers(recurse=False), *module.named_parameters(recurse=False)]
    items += [(k, v) for k, v in vars(module).items() if isinstance(v, Tensor)]
    items += [(f"codes.{k}", v) for k, v in (getattr(module, "codes", None) or {}).items()]
    for name, t in items:
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen[key] = name
        out[name] = t.untyped_storage().nbytes()
    return out


class QuantizedLinear(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int | None, symmetric: bool,
        bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"unsupported bits {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.codes: dict[str, Tensor] | None = None  # portable format, kept only on request
        self.r8 = False  # int4 rows interleaved for the int8-activation decode GEMV (see interleave_rows_)
        # forward's kernel path in that layout: R8Path.PREFILL (the AMX-BF16 GEMM from 48 rows on the amx
        # kernel variant, else R8Path.I16: int16 activations per weight group), R8Path.EXACT (float
        # activations) or R8Path.Q8 (int8 activations: the fused decode step's)
        self.r8_path = R8Path.PREFILL
        # int8 / plain-layout int4 forward's kernel path: Path.PREFILL (AMX from 48 rows where the variant
        # has it, else Path.AUTO_I16 (int8): int16 activations, per row up to 12 rows as the fused decode
        # step, per 128 columns above; Path.AUTO (int4)) or Path.AUTO (float activations: with
        # QUANTCHAT_NO_Q8=1, as everywhere)
        self.i8_path = Path.AUTO if envs.QUANTCHAT_NO_Q8 else Path.PREFILL

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_float(
        cls, weight: Tensor, bias: Tensor | None, bits: int, group_size: int | None = None,
        symmetric: bool = True, clip: Tensor | None = None, keep_codes: bool = False,
        act_dtype: torch.dtype | None = None,
    ) -> "QuantizedLinear":
        """Round-to-nearest quantization of a float weight [out, in]."""
        N, K = weight.shape
        w = weight.detach().float().cpu()
        if bits == 8:
            q, s = rtn.quantize_int8(w)
            codes = {"qweight": q, "scales": s}
        else:
            if group_size is None:
                raise ValueError("int4 needs a group size")
            q, s, z = rtn.quantize_int4(w, group_size, symmetric, clip)
            codes = {"qweight": rtn.pack_int4(q), "scales": s, "zeros": z}
        return cls.from_codes(codes, K, N, bits, group_size, symmetric, bias, weight.device,
                              act_dtype or weight.dtype, keep_codes)

    @classmethod
    def from_codes(
        cls, codes: dict[str, Tensor], in_features: int, out_features: int, bits: int, group_size: int | None,
        symmetric: bool, bias: Tensor | None, device: torch.device | str, act_dtype: torch.dtype,
        keep_codes: bool = False,
    ) -> "QuantizedLinear":
        """Build from the portable format (as saved in checkpoints) and lay it out for the device's kernel."""
        m = cls(in_features, out_features, bits, group_size, symmetric, bias)
        m.act_dtype = act_dtype
        m.device_type = torch.device(device).type
        m.own_kernel = m.device_type == "cpu" and use_own_cpu_kernels()
        if m.own_kernel:  # the packed codes are the kernel's layout
            m.register_buffer("qweight", codes["qweight"].contiguous())
            if bits == 4:
                scales, mins = resident_int4(codes)
                m.register_buffer("scales", scales.contiguous())
                m.register_buffer("mins", mins.contiguous())
                m.k_padded = codes["qweight"].shape[1] * 2
            else:  # the names the tied embedding and checkpoints use
                m.register_buffer("scales", codes["scales"].float().contiguous())
                m.weight_int8 = m.qweight
        elif bits == 8:
            m.register_buffer("weight_int8", codes["qweight"].to(device=device, dtype=torch.int8))
            m.register_buffer("scales", codes["scales"].to(device=device, dtype=act_dtype))
        else:
            m._pack_int4(codes, device, act_dtype)
        if m.bias is not None:
            m.bias.data = m.bias.data.to(device=device, dtype=act_dtype)
        if keep_codes:
            m.codes = {k: v.cpu() for k, v in codes.items()}
        return m

    def _pack_int4(self, codes: dict[str, Tensor], device, act_dtype: torch.dtype) -> None:
        q = rtn.unpack_int4(codes["qweight"])  # [N, Kp] uint8
        s16, m16 = resident_int4(codes)
        self.k_padded = q.shape[1]
        if torch.device(device).type == "cuda":
            packed, sz, inner_k_tiles = tinygemm_operands(q, s16, m16)
            self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack(
                packed.to(device), inner_k_tiles))
            self.register_buffer("scales_and_zeros", sz.to(device=device, dtype=torch.bfloat16))
        else:  # float16 scales / mins kept; torch's op wants [G, N, 2] in x's dtype: made per call (small)
            self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.to(torch.int32), 1))
            self.register_buffer("scales", s16.contiguous())
            self.register_buffer("mins", m16.contiguous())

    def interleave_rows_(self) -> bool:
        """Re-lay int4 weights held for quantchat's CPU kernels in the row-interleaved "r8" layout
        (``rtn.interleave_rows8``, in place; the same bytes plus padding to 8 rows). Its decode kernel
        (``R8Path.Q8``, run by the fused decode step) multiplies them with activations rounded to int8 per 32
        columns, as llama.cpp's Q4 x Q8_0 dot products: 1.3-1.6x faster decode, 2-4x at batched decode,
        each row's result independent of the other rows (exact integer sums). ``forward`` (prefill) rounds
        activations to int16 per row and weight group instead (``r8_path = R8Path.I16``: vpmaddwd on the
        codes, 1.15-1.35x the prefill speed of dequantized tiles + sgemm on this AVX2 machine; KL 6e-7
        against float activations on the default model, perplexity equal to 4 digits, top-1 agreement
        99.9 %: the size of change a float16 KV cache makes). int8 prompt activations cost +0.05 %
        perplexity and flipped the greedy answer to "What is the capital of France?" from "The capital of
        France is Paris." to llama.cpp's French ramble, so prefill does not use them. ``R8Path.EXACT`` keeps
        float activations. True if the module is (now) in that layout; False where it does not apply (int8,
        torch's kernel layouts, group sizes that are not a multiple of 32)."""
        if self.r8:
            return True
        if not getattr(self, "own_kernel", False) or self.bits != 4 or self.group_size % 32:
            return False
        q, s, m = rtn.interleave_rows8(self.qweight, self.scales, self.mins)
        self.qweight, self.scales, self.mins = q, s, m  # registered buffers: replaced in place
        self.r8 = True
        return True

    # -- compute -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.own_kernel:
            if self.r8:
                y = cpu.int4r8_linear(x, self.qweight, self.scales, self.mins, self.out_features,
                                      self.group_size, self.in_features, self.r8_path)
            elif self.bits == 8:
                y = cpu.int8_linear(x, self.qweight, self.scales, self.i8_path)
            else:
                y = cpu.int4_linear(x, self.qweight, self.scales, self.mins, self.group_size, self.in_features,
                                    self.i8_path)
            return y if self.bias is None else y + self.bias
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.bits == 8:
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        else:
            if self.k_padded != self.in_features:
                x2 = F.pad(x2, (0, self.k_padded - self.in_features))
            if self.device_type == "cuda":  # rows padded to a multiple of 8: drop the padding's columns
                y = torch.ops.aten._weight_int4pack_mm(
                    x2.to(torch.bfloat16).contiguous(), self.weight_int4, self.group_size,
                    self.scales_and_zeros)[:, :self.out_features].to(x.dtype)
            else:
                sz = int4pack_scales_and_zeros(self.scales, self.mins).to(x2.dtype)
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4, self.group_size, sz)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def resident_codes(self) -> dict[str, Tensor] | None:
        """The codes as held for quantchat's kernels (no copy; a de-interleaved copy in the r8 layout): int4
        ``{qweight, scales, mins}`` (float16),
        int8 ``{qweight, scales}``; None on the torch-kernel layouts (see ``keep_codes``)."""
        if not getattr(self, "own_kernel", False):
            return None
        if self.bits == 8:
            return {"qweight": self.qweight, "scales": self.scales}
        if self.r8:  # a copy in the portable layout
            q, s, m = rtn.deinterleave_rows8(self.qweight, self.scales, self.mins, self.out_features)
            return {"qweight": q, "scales": s, "mins": m}
        return {"qweight": self.qweight, "scales": self.scales, "mins": self.mins}

    def dequantized_weight(self) -> Tensor:
        """Float32 [out, in] weight, as the kernels see it (reference path). From the resident codes with
        quantchat's kernels; otherwise from the codes kept with ``keep_codes``."""
        codes = self.resident_codes() or self.codes
        if codes is None:
            raise RuntimeError("codes were not kept for torch's kernel layout (build with keep_codes=True)")
        return rtn.dequantize_codes(codes, self.in_features)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Dequantize-then-matmul in float32 (what the fast kernels must match)."""
        w = self.dequantized_weight().to(x.device)
        y = x.float() @ w.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    @property
    def weight_bytes(self) -> int:
        """Bytes of every tensor the module holds (buffers, the bias, kept codes; shared storage once)."""
        return sum(module_tensor_bytes(self).values())

    def extra_repr(self) -> str:
        fmt = "int8 per-channel" if self.bits == 8 else \
            f"int4 g{self.group_size} {'sym' if self.symmetric else 'asym'}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {fmt}"
