"""Dense linear layers in the memory layout the CPU reads fastest.

At batch 1 a linear layer is a matrix-vector product bound by memory bandwidth. On AVX2 CPUs
MKL reads a weight stored transposed ([in, out], ``x @ W_t``) markedly faster than the usual
[out, in] layout when out > in (measured with 2 threads on SmolLM2's shapes, weights out of cache:
3072x576 at 17-19 GB/s against 11, the 49152x576 LM head at 20 GB/s against 12). Only the
storage changes; ``.weight`` still gives the usual [out, in] view.

bfloat16 on CPUs without native bf16 math (no AVX512-BF16/AMX, e.g. AVX2 machines): torch's bf16
matrix-matrix products run a slow emulated path (about 85 tokens/s of SmolLM2 prefill here against
530 in float32), while its bf16 matrix-vector path is fine. So for more than one row the weight is
widened to float32 one layer at a time for the product (a per-layer temporary, never the model).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix hardware (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


class TransposedLinear(nn.Module):
    """``y = x W^T + b`` with W kept as a contiguous [in_features, out_features] tensor (float32)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def weight(self) -> Tensor:
        """The [out, in] view of the stored weight (no copy)."""
        return self.weight_t.t()

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout=transposed"


class EmulatedBf16Linear(nn.Linear):
    """A bfloat16 linear for CPUs without bf16 hardware: float32 products for more than one row.

    (One row keeps torch's bf16 matrix-vector kernel, which is fast in the usual [out, in] layout
    and 10x slower transposed.)
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() > x.shape[-1]:
            b = None if self.bias is None else self.bias.float()
            return nn.functional.linear(x.float(), self.weight.float(), b).to(x.dtype)
        return nn.functional.linear(x, self.weight, self.bias)


def use_cpu_layout(model: nn.Module) -> nn.Module:
    """Swap each wide float32 ``nn.Linear`` (out > in) of a CPU model for a ``TransposedLinear``, in place.

    In bfloat16 without native bf16 hardware every linear becomes an ``EmulatedBf16Linear`` instead.

    A tied LM head keeps sharing its storage with the token embedding (which reads rows of the view).
    """
    tied = getattr(model, "output", None) is not None and getattr(model, "tok_embeddings", None) is not None \
        and model.output.weight is model.tok_embeddings.weight
    emulated = not cpu_has_native_bf16()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            if child.weight.dtype == torch.bfloat16 and emulated:
                child.__class__ = EmulatedBf16Linear  # same parameters, different forward
            elif child.weight.dtype == torch.float32 and child.out_features > child.in_features:
                setattr(parent, name, TransposedLinear(child.weight.detach(), child.bias))
    if tied and isinstance(model.output, TransposedLinear):
        model.tok_embeddings.weight = nn.Parameter(model.output.weight, requires_grad=False)
    return model
