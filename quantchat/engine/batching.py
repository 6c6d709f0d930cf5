"""The batching policy: how many prompt tokens a step prefills, which waiting prompts go together."""

from __future__ import annotations

import collections

from quantchat.engine.sequence import Sequence

PREFILL_STEP = 256  # prompt tokens prefilled between two decode steps
PREFILL_STEP_ALONE = 512  # ... when nothing decodes meanwhile (fewer, larger forwards)
GROUP_PREFILL_TOKENS = 2048  # rows x padded length of one grouped prefill of short prompts
FORWARD_COST_ROWS = 16  # the fixed cost of a prefill forward, in token rows (about 30 ms vs 2 ms a row here)


def is_short(seq: Sequence, prefill_step: int = PREFILL_STEP) -> bool:
    """Whether ``seq`` can join a grouped (padded, one-forward) prefill: one chunk, no prompt logprobs."""
    return len(seq.prompt) <= prefill_step and not seq.prompt_logprobs


def take_admissions(waiting: collections.deque[Sequence], free: int, prefill_step: int = PREFILL_STEP
                    ) -> tuple[Sequence | None, list[Sequence]]:
    """Pop what starts now from the front of ``waiting`` (``free`` batch slots): a long prompt alone (its
    prefill then runs chunk by chunk), or a group of short prompts to prefill together in padded forwards
    of at most ``GROUP_PREFILL_TOKENS`` rows x length."""
    group: list[Sequence] = []
    longest = 0
    while waiting and len(group) < free:
        seq = waiting[0]
        short = is_short(seq, prefill_step)
        if not short and not group:
            return waiting.popleft(), group
        if not short or max(longest, len(seq.prompt)) * (len(group) + 1) > GROUP_PREFILL_TOKENS:
            break
        group.append(waiting.popleft())
        longest = max(longest, len(seq.prompt))
    return None, group


def split_padded(new_tokens: list[int], forward_rows: int = FORWARD_COST_ROWS) -> list[tuple[int, int]]:
    """Split prompts sorted by the tokens they still compute (ascending) into runs [lo, hi) prefilled one
    padded forward each, at the least cost: a forward costs ``forward_rows`` plus its padded rows
    (runs x longest), in units of one token row. Exact (dynamic programming over the cut points)."""
    n = len(new_tokens)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for hi in range(1, n + 1):
        for lo in range(hi):
            c = best[lo] + forward_rows + (hi - lo) * new_tokens[hi - 1]
            if c < best[hi]:
                best[hi], cut[hi] = c, lo
    runs, hi = [], n
    while hi > 0:
        runs.append((cut[hi], hi))
        hi = cut[hi]
    return runs[::-1]
