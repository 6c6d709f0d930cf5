"""Perplexity over a token stream with fixed windows (non-overlapping by default, or a sliding stride).

With ``stride == window`` each window is scored on all its tokens but the first (which has no
context inside the window), the convention of llama.cpp's perplexity tool with non-overlapping
chunks. With a smaller stride each window re-reads ``window - stride`` tokens of context and scores
only the new ones, so every token after the first is scored exactly once either way.

The windows are model-agnostic: ``iter_windows`` / ``score_windows`` take a function that returns
the logits of one window, so the same spans and scoring serve quantchat's models
(``model_logits_fn``), KL divergence between two models, and llama.cpp as a peer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from quantchat.errors import QuantchatError

# (start, end) of a window in the token stream -> logits [end - start, vocab] (any device, any float dtype)
LogitsFn = Callable[[int, int], Tensor]


@dataclass
class PerplexityResult:
    nll_sum: float
    tokens_scored: int
    windows: int
    window_nll: list[float] = field(default_factory=list)  # summed NLL of each window
    window_tokens: list[int] = field(default_factory=list)  # tokens scored in each window

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens_scored)

    def add_window(self, nll: float, n_tokens: int) -> None:
        """Account one scored window: its summed NLL over ``n_tokens`` targets."""
        self.nll_sum += nll
        self.tokens_scored += n_tokens
        self.windows += 1
        self.window_nll.append(nll)
        self.window_tokens.append(n_tokens)

    @property
    def window_ppl(self) -> list[float]:
        return [math.exp(n / c) for n, c in zip(self.window_nll, self.window_tokens)]


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


def model_logits_fn(model, ids: list[int]) -> LogitsFn:
    """Logits of quantchat's ``Transformer`` for a window of ``ids`` (plain causal pass, no KV cache)."""
    tokens = torch.tensor(ids, dtype=torch.long, device=model.device)

    def logits(start: int, end: int) -> Tensor:
        return model(tokens[start:end][None])[0]

    return logits


def iter_windows(
    logits_fn: LogitsFn, ids: list[int], window: int, stride: int | None = None,
) -> Iterator[tuple[tuple[int, int, int], Tensor, Tensor]]:
    """For each window: (span, float32 logits predicting the scored tokens [n, V], the scored tokens [n])."""
    stride = stride or window
    spans = window_spans(len(ids), window, stride)
    if not spans:
        raise QuantchatError(f"text too short for perplexity: {len(ids)} tokens")
    for start, end, first in spans:
        logits = logits_fn(start, end)
        pred = logits[first - start - 1:end - start - 1].float()
        yield (start, end, first), pred, torch.tensor(ids[first:end], dtype=torch.long, device=pred.device)


def count_windows(n_tokens: int, window: int, stride: int | None = None) -> int:
    return len(window_spans(n_tokens, window, stride or window))


@torch.inference_mode()
def score_windows(
    logits_fn: LogitsFn, ids: list[int], window: int = 512, stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of the token stream ``ids`` under ``logits_fn``, window by window."""
    total = count_windows(len(ids), window, stride) if progress else 0
    res = PerplexityResult(0.0, 0, 0)
    for i, (_, pred, targets) in enumerate(iter_windows(logits_fn, ids, window, stride)):
        logp = F.log_softmax(pred, dim=-1)
        nll = -float(logp.gather(1, targets[:, None]).sum())
        res.add_window(nll, len(targets))
        if progress:
            progress(i + 1, total)
    return res


@torch.inference_mode()
def perplexity(
    model, ids: list[int], window: int = 512, stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    return score_windows(model_logits_fn(model, ids), ids, window, stride, progress)
