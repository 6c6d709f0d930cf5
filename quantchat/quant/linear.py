"""``QuantizedLinear``: a weight-only quantized replacement for ``nn.Linear`` (module swap).

The weights stay packed in memory and run through torch's low-bit kernels:

* CPU with AVX2 (the usual case): quantchat's own C++ kernels (``quantchat.kernels.cpu``), which read
  the portable codes as stored (no repacking) and beat float32; torch's weight-only CPU kernels
  are slower than float32 on AVX2-only CPUs and serve as the fallback when ours cannot be built.
* int8 (per-channel): ``torch._weight_int8pack_mm`` (CPU fallback and CUDA), codes int8 [N, K] as stored.
* int4 (group-wise, symmetric or asymmetric): on CPU ``torch._weight_int4pack_mm_for_cpu`` over the
  layout made by ``_convert_weight_to_int4pack_for_cpu``; on CUDA the tinygemm kernel
  ``torch._weight_int4pack_mm`` (bfloat16 activations). Both compute ``(code - 8) * scale + bias``
  per group, so a zero point z (fractional for asymmetric RTN) becomes the bias ``(8 - z) * scale``.

``reference_forward`` is the plain dequantize-then-matmul path the kernels are tested against.
The portable codes (``quant.rtn`` formats) are what checkpoints store; the kernel layout is made
at load, and the portable codes are dropped unless ``keep_codes`` (needed only to save again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantchat.quant import rtn


def use_own_cpu_kernels() -> bool:
    """quantchat's AVX2 kernels are built and loadable (``QUANTCHAT_NO_KERNELS=1`` turns them off)."""
    from quantchat.kernels import cpu

    return cpu.available()

METHODS_BITS = {"int8": 8, "int4": 4}


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
        if m.own_kernel:  # portable codes are the kernel's layout
            m.register_buffer("qweight", codes["qweight"].contiguous())
            m.register_buffer("scales", codes["scales"].float().contiguous())
            if bits == 4:
                m.register_buffer("zeros", codes["zeros"].float().contiguous())
                m.k_padded = codes["qweight"].shape[1] * 2
            else:  # the names the tied embedding and checkpoints use
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
        scales = codes["scales"].float()
        zeros = codes["zeros"].float()
        self.k_padded = q.shape[1]
        bias = (8 - zeros) * scales  # (code - z) * s == (code - 8) * s + (8 - z) * s
        sz = torch.stack([scales.t(), bias.t()], dim=-1).contiguous()  # [G, N, 2]
        if torch.device(device).type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack(self._cuda_pack(q, device), 8)
            self.register_buffer("weight_int4", packed)
            self.register_buffer("scales_and_zeros", sz.to(device=device, dtype=torch.bfloat16))
        else:
            self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.to(torch.int32), 1))
            self.register_buffer("scales_and_zeros", sz.to(dtype=act_dtype))

    @staticmethod
    def _cuda_pack(q: Tensor, device) -> Tensor:
        """tinygemm's input: uint8 [N, K/2] with the even column in the high nibble."""
        q = q.to(device)
        return (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)

    # -- compute -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.own_kernel:
            from quantchat.kernels import cpu

            if self.bits == 8:
                y = cpu.int8_linear(x, self.qweight, self.scales)
            else:
                y = cpu.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.in_features)
            return y if self.bias is None else y + self.bias
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.bits == 8:
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        else:
            if self.k_padded != self.in_features:
                x2 = F.pad(x2, (0, self.k_padded - self.in_features))
            if self.device_type == "cuda":
                y = torch.ops.aten._weight_int4pack_mm(
                    x2.to(torch.bfloat16), self.weight_int4, self.group_size, self.scales_and_zeros).to(x.dtype)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x2, self.weight_int4, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> Tensor:
        """Float32 [out, in] weight from the kept portable codes (reference path; needs keep_codes)."""
        if self.codes is None and self.own_kernel:
            self.codes = {"qweight": self.qweight, "scales": self.scales}
            if self.bits == 4:
                self.codes["zeros"] = self.zeros
        if self.codes is None:
            raise RuntimeError("portable codes were not kept (build with keep_codes=True)")
        if self.bits == 8:
            return rtn.dequantize_int8(self.codes["qweight"], self.codes["scales"])
        q = rtn.unpack_int4(self.codes["qweight"])
        return rtn.dequantize_int4(q, self.codes["scales"], self.codes["zeros"], self.in_features)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Dequantize-then-matmul in float32 (what the fast kernels must match)."""
        w = self.dequantized_weight().to(x.device)
        y = x.float() @ w.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        fmt = "int8 per-channel" if self.bits == 8 else \
            f"int4 g{self.group_size} {'sym' if self.symmetric else 'asym'}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {fmt}"
