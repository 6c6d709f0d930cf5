"""Sampling: the draw is exact and seeded; temperature, top-k and top-p restrict it as documented."""

from __future__ import annotations

import pytest
import torch

from quantchat.kernels import cpu
from quantchat.sampling.sampling import (SamplingParams, _invert_cdf, draw, draw_logits, make_generator, sample_token,
                                         sampling_probs)


def test_draw_follows_the_distribution():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    g = make_generator(1)
    n = 20000
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(n)]), minlength=6).double()
    assert counts[0] == counts[2] == counts[5] == 0  # zero weight: never drawn
    expected = probs.double() * n
    sd = (expected * (1 - probs.double())).sqrt()
    assert ((counts - expected).abs() <= 5 * sd + 1e-9).all(), counts


def test_draw_takes_unnormalized_weights_and_edge_rows():
    g = make_generator(0)
    assert draw(torch.tensor([0.0, 0.0, 7.0]), g) == 2
    assert draw(torch.tensor([3.0]), g) == 0
    assert {draw(torch.tensor([2.0, 0.0, 2.0, 0.0]), g) for _ in range(200)} == {0, 2}


def test_seeded_sampling_repeats_and_seeds_differ():
    logits = torch.randn(50000, generator=torch.Generator().manual_seed(3)) * 2
    p = SamplingParams(temperature=1.0)
    a = [sample_token(logits, p, None, make_generator(7)) for _ in range(3)]
    assert len(set(a)) == 1
    g1, g2 = make_generator(7), make_generator(8)
    s1 = [sample_token(logits, p, None, g1) for _ in range(20)]
    s2 = [sample_token(logits, p, None, g2) for _ in range(20)]
    assert s1 != s2


def test_top_k_top_p_and_greedy_restrict_the_support():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0, -2.0])
    g = make_generator(0)
    assert {sample_token(logits, SamplingParams(temperature=1.0, top_k=2), None, g) for _ in range(300)} == {0, 1}
    probs = torch.softmax(logits, -1)  # 0.66, 0.24, 0.09, ...: top_p 0.8 keeps the first two
    kept = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert (kept[2:] == 0).all() and torch.allclose(kept[:2], probs[:2] / probs[:2].sum())
    assert {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.8), None, g) for _ in range(300)} == {0, 1}
    assert sample_token(logits, SamplingParams(temperature=0.0), None, g) == 0


def test_sample_rows_equals_one_by_one():
    from quantchat.sampling.sampling import sample_rows

    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(2)) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8),
              SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0.5, repetition_penalty=1.2),
              SamplingParams(temperature=1.3)]
    got = sample_rows(logits, params, [make_generator(i) for i in range(5)])
    assert got[2] is None and got[3] is None  # top-k and penalties: row by row
    want = [sample_token(logits[i], params[i], None, make_generator(i)) for i in range(5)]
    assert [got[i] for i in (0, 1, 4)] == [want[i] for i in (0, 1, 4)]


@pytest.mark.skipif(not cpu.available(), reason="quantchat's CPU kernels unavailable")
@pytest.mark.parametrize("V,temp", [(49152, 0.7), (1003, 1.0), (5, 0.3), (1, 1.0)])
def test_logits_kernel_draws_what_softmax_and_the_cdf_draw(V, temp):
    """The one-pass C++ draw against torch: softmax at the temperature, float64 cumsum, first cdf > u."""
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(8, V, generator=g) * 4
    if V > 1:
        logits[1, ::3] = float("-inf")  # masked tokens
    for trial in range(25):
        u = torch.rand(8, dtype=torch.float64, generator=g)
        if trial == 0:
            u[0], u[1] = 0.0, 1.0 - 1e-16  # the ends
        got = cpu.sample_logits(logits, torch.full((8,), 1.0 / temp), u).tolist()
        want = _invert_cdf(torch.softmax(logits / temp, -1), u)
        assert got == want
        assert all(torch.isfinite(logits[b, t]) for b, t in enumerate(got))


@pytest.mark.skipif(not cpu.available(), reason="quantchat's CPU kernels unavailable")
def test_logits_draw_follows_the_distribution_and_falls_back_on_nan():
    logits = torch.tensor([[2.0, float("-inf"), 0.5, 1.0, -1.0, float("-inf"), 0.0, 3.0, -0.5]])
    g = make_generator(5)
    n = 20000
    picks = torch.tensor([draw_logits(logits, [0.8], [g])[0] for _ in range(n)])
    counts = torch.bincount(picks, minlength=9).double()
    probs = torch.softmax(logits[0].double() / 0.8, -1)
    assert counts[1] == counts[5] == 0
    expected = probs * n
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probs)).sqrt() + 1e-9).all(), counts
    assert cpu.sample_logits(torch.full((1, 4), float("nan")), torch.ones(1), torch.zeros(1, dtype=torch.float64)).item() == -1
    assert draw_logits(torch.tensor([[0.0, float("nan")]]), [1.0], [g])[0] in (0, 1)  # torch's rule decides


def test_keep_freed_memory_applies_once_and_can_be_turned_off():
    """The engine keeps large freed buffers in the heap (glibc): applied once per process, off with
    QUANTCHAT_KEEP_FREED_MEMORY=0 (checked in fresh processes)."""
    import subprocess
    import sys

    code = ("from quantchat.engine.allocator import keep_freed_memory as k; "
            "import platform; print(k(), k(), platform.libc_ver()[0])")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    env = {**__import__("os").environ, "QUANTCHAT_KEEP_FREED_MEMORY": "0"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    assert on[0] == on[1]
    if on[2] == "glibc":
        assert on[0] == "True"
    assert off[:2] == ["False", "False"]


def test_draw_never_crashes_on_overflowed_weights():
    """Logits that overflowed (inf / NaN probabilities, no finite weight) still give a token id, not an
    IndexError in the scheduler's thread."""
    from quantchat.sampling.sampling import MIN_REPETITION_PENALTY, draw, sample_token

    for probs in (torch.tensor([float("nan")] * 4), torch.tensor([0.0, float("inf"), float("nan"), 0.0]),
                  torch.zeros(4)):
        assert 0 <= draw(probs) < 4
    logits = torch.tensor([1e38, 3e38, -1.0, 2.0])
    p = SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=MIN_REPETITION_PENALTY)
    assert 0 <= sample_token(logits, p, previous=torch.tensor([0, 1])) < 4
    from quantchat.errors import QuantchatError

    with pytest.raises(QuantchatError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=1e-308)
