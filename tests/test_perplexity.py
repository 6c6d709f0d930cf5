"""Perplexity against an independent cross-entropy from transformers; window coverage."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from quantchat.eval.perplexity import perplexity, window_spans
from quantchat.loading.hf_loader import load_model
from tiny_models import make_tiny_llama


@pytest.mark.parametrize("n,window,stride", [(10, 4, 4), (100, 16, 16), (100, 16, 5), (37, 8, 3), (5, 8, 8)])
def test_windows_score_every_token_once(n, window, stride):
    scored = []
    for start, end, first in window_spans(n, window, stride):
        assert end - start <= window and start < first <= end
        scored += range(first, end)
    if stride == window:
        # non-overlapping: every position except each window's first
        assert scored == [p for p in range(1, n) if p % window != 0]
    else:
        assert scored == list(range(1, n))


@pytest.mark.parametrize("stride", [32, 12])
def test_perplexity_matches_transformers(tmp_path, stride):
    ref = make_tiny_llama(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    got = perplexity(model, ids, window=32, stride=stride)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start, end, first in window_spans(len(ids), 32, stride):
            logits = ref(torch.tensor([ids[start:end]])).logits[0].double()
            tgt = torch.tensor(ids[first:end])
            nll += F.cross_entropy(logits[first - start - 1:end - start - 1], tgt, reduction="sum").item()
            count += len(tgt)
    assert got.tokens_scored == count
    assert got.ppl == pytest.approx(math.exp(nll / count), rel=1e-4)
