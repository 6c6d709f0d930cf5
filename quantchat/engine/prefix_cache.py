"""Prefix reuse over the engine's KV slots: which slot holds the longest prefix of a prompt, moving it
where the prompt runs, parking finished conversations, and the first-token logits of recent prompts.

``engine.slot_tokens[i]`` always names the tokens whose KV slot ``i`` holds (free slots keep what their
last sequence left, a finished sequence's answer included). A new prompt starts from the longest such prefix
found in any slot (swapped into its own slot from a free one, copied from a running one): a shared system
prompt, or a chat's earlier turns, are not computed again. Slots past the batch (an engine with more slots
than the scheduler's ``max_batch``) only park such conversations: a slot about to be overwritten first moves
what it caches into the least recently used parking slot. The first-token logits of the last
``PROMPT_LOGITS_KEPT`` prompts are kept too: a prompt seen again whose KV some slot still holds whole starts
decoding with no forward at all.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from torch import Tensor

from quantchat.engine.sequence import Sequence

if TYPE_CHECKING:
    from quantchat.engine.generate import Engine

PROMPT_LOGITS_KEPT = 16  # prompts whose first-token logits are kept (3 MB for a 49k vocabulary)


class PrefixCache:
    def __init__(self, engine: Engine, max_batch: int) -> None:
        self.engine, self.max_batch = engine, max_batch
        self.slot_stamp = [0] * engine.max_batch  # when each slot's content was last written or reused
        self._tick = 0
        self.prompt_logits: collections.OrderedDict[tuple[int, ...], Tensor] = collections.OrderedDict()
        self.cached_tokens_total = 0  # prompt tokens whose KV was reused, not computed

    def longest(self, seq: Sequence, slot: int = -1, whole: bool = False) -> tuple[int, int]:
        """The longest prefix of ``seq.prompt`` (at most all but its last token, or all of it with ``whole``)
        some slot holds now, and that slot (``slot`` itself on a tie); (0, slot) for sequences that want
        prompt logprobs."""
        best, src = 0, slot
        if not seq.prompt_logprobs:
            prompt, limit = seq.prompt, len(seq.prompt) - (0 if whole else 1)
            for i, toks in enumerate(self.engine.slot_tokens):
                n, top = 0, min(limit, len(toks))
                while n < top and toks[n] == prompt[n]:
                    n += 1
                if n > best or (n == best and i == slot):
                    best, src = n, i
        return best, src

    def whole_prompt_cached(self, seq: Sequence) -> bool:
        """Whether ``seq`` can start with no forward: its first-token logits are kept and a slot holds its
        whole prompt's KV."""
        return tuple(seq.prompt) in self.prompt_logits and self.longest(seq, whole=True)[0] == len(seq.prompt)

    def remember(self, seq: Sequence, logits: Tensor) -> None:
        """Keep the first-token logits [V] of ``seq.prompt`` (the last ``PROMPT_LOGITS_KEPT`` prompts)."""
        key = tuple(seq.prompt)
        self.prompt_logits[key] = logits.detach().clone()
        self.prompt_logits.move_to_end(key)
        while len(self.prompt_logits) > PROMPT_LOGITS_KEPT:
            self.prompt_logits.popitem(last=False)

    def kept_logits(self, seq: Sequence) -> Tensor:
        key = tuple(seq.prompt)
        self.prompt_logits.move_to_end(key)
        return self.prompt_logits[key]

    def reuse(self, seq: Sequence, slot: int, whole: bool = False) -> int:
        """Put the longest cached prefix of ``seq.prompt`` into ``slot``; returns its length (prefill starts
        there)."""
        best, src = self.longest(seq, slot, whole)
        toks = self.engine.slot_tokens
        in_place = best and src == slot and len(toks[slot]) == best  # nothing else to lose
        if best and src > slot:  # a free slot: swap, so what ``slot`` cached moves there instead of being lost
            self.swap(src, slot)
        elif not in_place:  # ``slot`` gets overwritten past the prefix: park what it caches first (also when
            self.park(slot)  # it shares only a system prompt with ``seq``), then copy the prefix from where it is
            best, src = self.longest(seq, slot, whole)
            if best and src != slot:
                self.copy(src, slot, best)
                self.touch(src)
        self.touch(slot)
        toks[slot] = seq.prompt[:best]
        seq.prefilled = seq.cached_tokens = best
        self.cached_tokens_total += best
        return best

    def touch(self, slot: int) -> None:
        self._tick += 1
        self.slot_stamp[slot] = self._tick

    def park(self, slot: int) -> None:
        """Move what ``slot`` caches into the least recently used parking slot (past ``max_batch``), unless
        that one holds something more recent."""
        toks, stamp = self.engine.slot_tokens, self.slot_stamp
        parking = range(self.max_batch, self.engine.max_batch)
        if not parking or not toks[slot]:
            return
        j = min(parking, key=lambda i: stamp[i] if toks[i] else -1)
        if not toks[j] or stamp[j] < stamp[slot]:
            self.swap(slot, j)

    def swap(self, a: int, b: int) -> None:
        """Exchange the KV (and ``slot_tokens``, and when each was last used) of slots ``a`` and ``b``."""
        self.slot_stamp[a], self.slot_stamp[b] = self.slot_stamp[b], self.slot_stamp[a]
        toks = self.engine.slot_tokens
        n = max(len(toks[a]), len(toks[b]))
        if n:
            for layer in self.engine.model.layers:
                cache = layer.attention.kv_cache
                for c in (cache.k_cache, cache.v_cache):
                    saved = c[a, :, :n].clone()
                    c[a, :, :n].copy_(c[b, :, :n])
                    c[b, :, :n].copy_(saved)
        toks[a], toks[b] = toks[b], toks[a]

    def copy(self, src: int, dst: int, length: int) -> None:
        for layer in self.engine.model.layers:
            cache = layer.attention.kv_cache
            cache.k_cache[dst, :, :length] = cache.k_cache[src, :, :length]
            cache.v_cache[dst, :, :length] = cache.v_cache[src, :, :length]
