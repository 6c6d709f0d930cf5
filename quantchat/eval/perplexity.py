"""Perplexity over a token stream with fixed windows (non-overlapping by default, or a sliding stride).

With ``stride == window`` each window is scored on all its tokens but the first (which has no
context inside the window), the convention of llama.cpp's perplexity tool with non-overlapping
chunks. With a smaller stride each window re-reads ``window - stride`` tokens of context and scores
only the new ones, so every token after the first is scored exactly once either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantchat.errors import QuantchatError


@dataclass
class PerplexityResult:
    nll_sum: float
    tokens_scored: int
    windows: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens_scored)


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) for each window; together they score tokens 1..n-1 once."""
    if window < 2 or not 0 < stride <= window:
        raise QuantchatError(f"need window >= 2 and 0 < stride <= window (got window {window}, stride {stride})")
    spans, start, scored_to = [], 0, 1
    while scored_to < n_tokens:
        end = min(start + window, n_tokens)
        if end - start < 2:
            break
        spans.append((start, end, max(scored_to, start + 1)))
        scored_to = end
        start += stride
        if stride == window:
            scored_to = start + 1  # non-overlapping: each window scores from its second token
    return spans


@torch.inference_mode()
def perplexity(
    model, ids: list[int], window: int = 512, stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    stride = stride or window
    spans = window_spans(len(ids), window, stride)
    if not spans:
        raise QuantchatError(f"text too short for perplexity: {len(ids)} tokens")
    tokens = torch.tensor(ids, dtype=torch.long, device=model.device)
    nll, count = 0.0, 0
    for i, (start, end, first) in enumerate(spans):
        logits = model(tokens[start:end][None])[0].float()
        targets = tokens[first:end]
        logp = F.log_softmax(logits[first - start - 1:end - start - 1], dim=-1)
        nll -= float(logp.gather(1, targets[:, None]).sum())
        count += len(targets)
        if progress:
            progress(i + 1, len(spans))
    return PerplexityResult(nll, count, len(spans))
