"""The KV cache: allocated once for ``max_batch`` sequence slots of ``max_seq_len`` positions.

Keys and values are written in place at each token's position (no concatenation, no growth).
Rows of the cache are sequence slots: one slot can be prefilled alone (``slot=i``) while a batched
decode step writes every slot at its own position.

The cache's dtype may be narrower than the activations' (float16 keys and values for a float32 model,
as llama.cpp's default): writes round to it, and attention reads the rounded values back in the
activations' dtype, so every path (prefill, prefix reuse, decode) attends over the same numbers.
Half the bytes per cached token: batched decode at long contexts reads the cache at memory speed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    def __init__(
        self, max_batch: int, max_seq_len: int, n_kv_head: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str = "cpu", sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        shape = (max_batch, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.sliding_window = sliding_window
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int, slot: int | None) -> tuple[Tensor, Tensor]:
        """Write k/v [B, H, T, D] at ``input_pos`` [B, T]; return the cached k/v of positions [0, kv_len)."""
        B, _, T, _ = k.shape
        kc, vc = self.k_cache, self.v_cache
        compute = k.dtype
        k, v = k.to(kc.dtype), v.to(kc.dtype)
        if slot is not None:  # rows slot .. slot + B - 1
            kc, vc = kc[slot:slot + B], vc[slot:slot + B]
        else:
            kc, vc = kc[:B], vc[:B]
        if B == 1:
            pos = input_pos[0]
            kc[0].index_copy_(1, pos, k[0])
            vc[0].index_copy_(1, pos, v[0])
        else:
            rows = torch.arange(B, device=k.device).unsqueeze(1)
            kc[rows, :, input_pos] = k.transpose(1, 2)
            vc[rows, :, input_pos] = v.transpose(1, 2)
        return kc[:, :, :kv_len].to(compute), vc[:, :, :kv_len].to(compute)

    def round_like_cache(self, x: Tensor) -> Tensor:
        """``x`` as it reads back after a write (rounded to the cache's dtype)."""
        dt = self.k_cache.dtype
        return x if x.dtype == dt else x.to(dt).to(x.dtype)


def attention_mask(input_pos: Tensor, kv_len: int, sliding_window: int | None = None) -> Tensor:
    """Boolean mask [B, 1, T, kv_len]: a query sees keys at or before its own position (within the window)."""
    key_pos = torch.arange(kv_len, device=input_pos.device)
    q = input_pos.unsqueeze(-1)
    mask = key_pos <= q
    if sliding_window:
        mask &= key_pos > q - sliding_window
    return mask.unsqueeze(1)
