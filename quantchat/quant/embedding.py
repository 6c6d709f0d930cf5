"""Int8 token embedding (per-row absmax), sharing its codes with a tied int8 LM head."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class QuantizedEmbedding(nn.Module):
    """Looks up int8 rows and scales them; with a tied head the int8 buffers are the head's own."""

    def __init__(self, weight_int8: Tensor, scales: Tensor, act_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.weight_int8 = weight_int8  # plain attributes: may be shared with the LM head's buffers
        self.scales = scales
        self.act_dtype = act_dtype

    def forward(self, idx: Tensor) -> Tensor:
        rows = self.weight_int8[idx].to(self.act_dtype)
        return rows * self.scales[idx].to(self.act_dtype).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"
