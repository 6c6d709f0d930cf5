"""Continuous batching: sequences join and leave the running batch at every decode step.

One background thread owns the model. Decoding sequences sit in KV slots ``0..d-1`` (so a
decode step is one batched forward over a contiguous block of the cache, no gather); the one
sequence being prefilled sits in slot ``d`` and is prefilled a chunk at a time between decode
steps, so a long prompt never stalls the others for long. Short prompts (one chunk, no prompt
logprobs) that wait together are prefilled together: right-padded forwards into slots
``d, d+1, ...`` (on CPU the weights are unpacked once for all of them instead of once each), split by
the tokens each still computes after prefix reuse, so that a mostly cached prompt is not padded up to a
new long one (``split_padded``).

Prefix reuse: ``engine.slot_tokens[i]`` always names tokens whose KV slot ``i`` holds (free slots
keep what their last sequence left, a finished sequence's answer included). A new prompt starts
from the longest such prefix found in any slot (swapped into its own slot from a free one, copied
from a running one): a shared system prompt, or a chat's earlier turns, are not computed again.
When a sequence finishes (or its client goes away) the last decoding slot swaps places with it, so
the finished conversation stays cached in a free slot for its next turn. Slots past the scheduler's
``max_batch`` (an engine with more slots than the batch) only park such conversations: a slot about to be
overwritten first moves what it caches into the least recently used parking slot, so at full load (every
batch slot busy) the conversations that just finished are still there for their next turn. KV slots are
allocated once (``Engine(max_batch=...)``), never per request. The first-token logits of the last
``PROMPT_LOGITS_KEPT`` prompts are kept too: a prompt seen again whose KV some slot still holds whole
(a regenerated answer, a retried or repeated request, the n choices of one request) starts decoding at once,
with no forward at all.

Each ``Sequence`` carries its own sampling parameters, stop strings, token limit and seed; its
events (text, token ids, log-probabilities, finish reason) go to a callback, usually an asyncio
queue fed across threads.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from quantchat.engine.generate import Engine
from quantchat.engine.stopping import StopStringMatcher
from quantchat.errors import QueueFullError
from quantchat.sampling.sampling import (
    SamplingParams,
    apply_openai_penalties,
    apply_repetition_penalty,
    make_generator,
    sample_rows,
    sample_token,
)

PREFILL_STEP = 256  # prompt tokens prefilled between two decode steps
GROUP_PREFILL_TOKENS = 2048  # rows x padded length of one grouped prefill of short prompts
PROMPT_LOGITS_KEPT = 16  # prompts whose first-token logits are kept (3 MB for a 49k vocabulary)
FORWARD_COST_ROWS = 16  # the fixed cost of a prefill forward, in token rows (about 30 ms vs 2 ms a row here)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class SeqEvent:
    """What one step produced for a sequence: text (stop-string safe), new token ids, their logprobs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # once, first, when asked (echo)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[SeqEvent], None]
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k best
    prompt_logprobs: bool = False
    decoder: object | None = None  # tokenizer stream decoder
    # state
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0
    cancelled: bool = False
    finished: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    _gen: torch.Generator | None = None
    _stopper: StopStringMatcher | None = None
    _next_logits: Tensor | None = None
    _prompt_lp: list[TokenLogprob] = field(default_factory=list)
    _stopped_by_string: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def length(self) -> int:
        """Tokens whose KV is in the slot (prompt + generated, except the newest sampled one)."""
        return len(self.prompt) + max(0, len(self.generated) - 1) if self.generated else self.prefilled


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


def token_logprobs(logits: Tensor, chosen: Tensor, k: int) -> list[TokenLogprob]:
    """Logprob of ``chosen`` [N] under ``logits`` [N, V] plus the top ``k`` alternatives of each row."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(1, chosen[:, None])[:, 0].tolist()
    if k > 0:
        vals, ids = torch.topk(lp, k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in picked]
    return [TokenLogprob(int(t), float(p), top) for t, p, top in zip(chosen.tolist(), picked, tops)]


class Scheduler:
    """Runs an ``Engine``'s slots as a continuously batched server loop on a background thread."""

    def __init__(self, engine: Engine, max_queue: int = 64, max_batch: int | None = None) -> None:
        """``max_batch``: sequences decoded together (default: every slot of the engine); the engine's
        other slots park finished conversations for prefix reuse."""
        self.engine = engine
        self.max_batch = max_batch or engine.max_batch
        if not 1 <= self.max_batch <= engine.max_batch:
            raise ValueError(f"max_batch {self.max_batch} outside the engine's 1..{engine.max_batch} slots")
        self.slot_stamp = [0] * engine.max_batch  # when each slot's content was last written or reused
        self._tick = 0
        self.max_queue = max_queue
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.decoding: list[Sequence] = []  # slot i holds decoding[i]
        self.prefilling: Sequence | None = None  # in slot len(decoding)
        self.cond = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.error: str | None = None
        # metrics
        self.requests_total = 0
        self.requests_finished = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.decode_steps = 0
        # where the loop's time goes: decode steps by batch size ([steps, seconds]; model, sampling and
        # events) and prompt prefill; the ratio of step times shows what batching gains (bench serve)
        self.decode_time: dict[int, list[float]] = {}
        self.prefill_seconds = 0.0
        self.prompt_tokens_cached_total = 0  # prompt tokens whose KV was reused, not computed
        self.prompt_logits: collections.OrderedDict[tuple[int, ...], Tensor] = collections.OrderedDict()
        self.started_at = time.time()

    # -- public, any thread -------------------------------------------------------------------
    def start(self) -> Scheduler:
        if not self.running:
            self.running = True
            self.thread = threading.Thread(target=self._loop, name="quantchat-scheduler", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, seq: Sequence) -> Sequence:
        self.engine.check_prompt(seq.prompt)
        seq.params.validate()
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self.waiting.append(seq)
            self.requests_total += 1
            self.cond.notify_all()
        return seq

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def running_batch(self) -> int:
        return len(self.decoding) + (self.prefilling is not None)

    def kv_usage(self) -> float:
        used = sum(s.length for s in self.decoding) + (self.prefilling.prefilled if self.prefilling else 0)
        return used / (self.max_batch * self.engine.max_seq_len)

    def stats(self) -> dict:
        return {
            "requests_total": self.requests_total,
            "requests_finished": self.requests_finished,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "queue_length": self.queue_length,
            "running_batch": self.running_batch,
            "max_batch": self.max_batch,
            "kv_cache_usage": self.kv_usage(),
            "decode_steps": self.decode_steps,
            "decode_time_by_batch": {b: list(v) for b, v in list(self.decode_time.items())},  # a snapshot
            "prefill_seconds_total": self.prefill_seconds,
            "prompt_tokens_cached_total": self.prompt_tokens_cached_total,
        }

    # -- the loop (scheduler thread only) -----------------------------------------------------
    def step(self) -> None:
        """One turn of the loop: drop cancelled sequences, admit and prefill waiting ones, one decode step.
        (Tests and profilers drive a scheduler that was not started with this.)"""
        self._drop_cancelled()
        group = self._admit()
        t0 = time.perf_counter()
        if group:
            self._prefill_group(group)
        if self.prefilling is not None:
            self._prefill_step()
        t1 = time.perf_counter()
        self.prefill_seconds += t1 - t0
        if self.decoding:
            b = len(self.decoding)
            self._decode_step()
            entry = self.decode_time.setdefault(b, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - t1

    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.running and not (self.waiting or self.decoding or self.prefilling):
                        self.cond.wait(timeout=1.0)
                    if not self.running:
                        break
                self.step()
        except Exception as e:  # the model failed: fail every request rather than hang them
            self.error = f"{type(e).__name__}: {e}"
            for seq in [*self.decoding, *([self.prefilling] if self.prefilling else []), *self.waiting]:
                self._finish(seq, "error", error=self.error)
            self.decoding, self.prefilling = [], None
            self.waiting.clear()
            self.running = False
            raise

    def _admit(self) -> list[Sequence]:
        """Start the next waiting sequence (its prefill runs chunk by chunk), or return a group of
        waiting short prompts to prefill together now."""
        group: list[Sequence] = []
        with self.cond:
            if self.prefilling is not None:
                return group
            free = self.max_batch - len(self.decoding)
            longest = 0
            while self.waiting and len(group) < free:
                seq = self.waiting[0]
                short = len(seq.prompt) <= PREFILL_STEP and not seq.prompt_logprobs
                if not short and not group:  # a long prompt: chunked prefill in slot d
                    self._start(self.waiting.popleft())
                    self._reuse_prefix(seq, len(self.decoding))
                    self.prefilling = seq
                    return group
                if not short or max(longest, len(seq.prompt)) * (len(group) + 1) > GROUP_PREFILL_TOKENS:
                    break
                self._start(self.waiting.popleft())
                group.append(seq)
                longest = max(longest, len(seq.prompt))
        return group

    def _start(self, seq: Sequence) -> None:
        seq._gen = make_generator(seq.params.seed, self.engine.device)
        seq._stopper = StopStringMatcher(seq.params.stop)
        seq.prefilled = 0
        self.prompt_tokens_total += len(seq.prompt)

    def _prefill_group(self, group: list[Sequence]) -> None:
        """Prefill short prompts together, in as few padded forwards as pay: sorted by the tokens each
        still has to compute (after prefix reuse), then split where padding the short ones up to the long
        ones would cost more than another forward (``split_padded``)."""
        rest, repeats, seen = [], [], set()
        for seq in group:  # a repeated prompt whose whole KV is cached: no forward
            key = tuple(seq.prompt)
            if self._whole_prompt_cached(seq):
                self._start_cached(seq)
            elif key in seen:  # the same prompt twice in the group (n choices): computed once
                repeats.append(seq)
            else:
                seen.add(key)
                rest.append(seq)
        new = [len(s.prompt) - self._cached_prefix(s)[0] for s in rest]
        order = sorted(range(len(rest)), key=lambda i: new[i])
        for lo, hi in split_padded([new[i] for i in order]):
            self._prefill_rows([rest[i] for i in order[lo:hi]])
        for seq in repeats:
            if self._whole_prompt_cached(seq):
                self._start_cached(seq)
            else:  # its twin finished at once and its slot was taken again
                self._prefill_rows([seq])

    def _whole_prompt_cached(self, seq: Sequence) -> bool:
        """Whether ``seq`` can start with no forward: its first-token logits are kept and a slot holds
        its whole prompt's KV."""
        return (tuple(seq.prompt) in self.prompt_logits
                and self._cached_prefix(seq, whole=True)[0] == len(seq.prompt))

    def _cached_prefix(self, seq: Sequence, slot: int = -1, whole: bool = False) -> tuple[int, int]:
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

    def _remember(self, seq: Sequence, logits: Tensor) -> None:
        """Keep the first-token logits [V] of ``seq.prompt`` (the last ``PROMPT_LOGITS_KEPT`` prompts)."""
        key = tuple(seq.prompt)
        self.prompt_logits[key] = logits.detach().clone()
        self.prompt_logits.move_to_end(key)
        while len(self.prompt_logits) > PROMPT_LOGITS_KEPT:
            self.prompt_logits.popitem(last=False)

    def _start_cached(self, seq: Sequence) -> None:
        """Start ``seq`` in slot d from a slot holding its whole prompt and its kept first-token logits."""
        d, key = len(self.decoding), tuple(seq.prompt)
        self._reuse_prefix(seq, d, whole=True)
        self.prompt_logits.move_to_end(key)
        self.decoding.append(seq)
        if self._first_token(seq, self.prompt_logits[key][None], SeqEvent(prompt_tokens=len(seq.prompt))):
            self._remove([d])

    @torch.inference_mode()
    def _prefill_rows(self, group: list[Sequence]) -> None:
        """Prefill short prompts in one forward (right-padded; the padding's KV lands past each prompt's
        end, where the sequence's own tokens overwrite it before anything reads it), into slots d.."""
        d, dev = len(self.decoding), self.engine.device
        starts = [self._reuse_prefix(seq, d + i) for i, seq in enumerate(group)]
        T = max(len(s.prompt) - st for s, st in zip(group, starts))
        ids = torch.zeros(len(group), T, dtype=torch.long)
        for i, (s, st) in enumerate(zip(group, starts)):
            ids[i, :len(s.prompt) - st] = torch.tensor(s.prompt[st:])
        # padding positions past the context are clamped (their KV is never read)
        pos = (torch.tensor(starts)[:, None] + torch.arange(T)).clamp(max=self.engine.max_seq_len - 1)
        keep = torch.tensor([len(s.prompt) - st - 1 for s, st in zip(group, starts)])
        logits = self.engine.model(ids.to(dev), pos.to(dev), kv_len=int(pos.max()) + 1, slot=d,
                                   keep=keep.to(dev))[:, 0]
        done = []
        for i, seq in enumerate(group):
            seq.prefilled = len(seq.prompt)
            self.engine.slot_tokens[d + i] = list(seq.prompt)
            self._remember(seq, logits[i])
            self.decoding.append(seq)
            if self._first_token(seq, logits[i:i + 1], SeqEvent(prompt_tokens=len(seq.prompt))):
                done.append(d + i)
        self._remove(done)

    def _first_token(self, seq: Sequence, logits: Tensor, first: SeqEvent) -> bool:
        """Emit ``seq``'s first event (its first token from logits [1, V], unless it wants none); return
        whether it already finished."""
        if seq.params.max_new_tokens == 0:
            first.finish_reason = "length"
            self._emit_final(seq, first)
            return True
        return self._sample(seq, logits, first)

    def _drop_cancelled(self) -> None:
        with self.cond:
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
                self._finish(seq, "abort")
        if self.prefilling is not None and self.prefilling.cancelled:
            self._finish(self.prefilling, "abort")
            self.prefilling = None
        gone = [i for i, s in enumerate(self.decoding) if s.cancelled]
        for i in gone:
            self._finish(self.decoding[i], "abort")
        self._remove(gone)

    @torch.inference_mode()
    def _prefill_step(self) -> None:
        seq = self.prefilling
        assert seq is not None
        slot = len(self.decoding)
        start = seq.prefilled
        chunk = seq.prompt[start:start + PREFILL_STEP]
        dev = self.engine.device
        ids = torch.tensor(chunk, dtype=torch.long, device=dev)[None]
        pos = torch.arange(start, start + len(chunk), device=dev)[None]
        logits = self.engine.model(ids, pos, kv_len=start + len(chunk), slot=slot,
                                   last_only=not seq.prompt_logprobs)[0]
        seq.prefilled += len(chunk)
        if seq.prompt_logprobs:
            if start == 0:
                seq._prompt_lp.append(TokenLogprob(seq.prompt[0], None, []))
            nxt = seq.prompt[start + 1:start + len(chunk) + 1]
            if nxt:
                k = seq.logprobs or 0
                seq._prompt_lp += token_logprobs(logits[:len(nxt)], torch.tensor(nxt, device=dev), k)
        if seq.prefilled < len(seq.prompt):
            return
        self.engine.slot_tokens[slot] = list(seq.prompt)
        self._remember(seq, logits[-1])
        self.prefilling = None
        first = SeqEvent(prompt_logprobs=seq._prompt_lp if seq.prompt_logprobs else None,
                         prompt_tokens=len(seq.prompt))
        seq._prompt_lp = []
        self.decoding.append(seq)
        if self._first_token(seq, logits[-1:], first):
            self._remove([len(self.decoding) - 1])

    @torch.inference_mode()
    def _decode_step(self) -> None:
        dev = self.engine.device
        tokens = torch.tensor([s.generated[-1] for s in self.decoding], dtype=torch.long, device=dev)
        positions = torch.tensor([len(s.prompt) + len(s.generated) - 1 for s in self.decoding], device=dev)
        logits = self.engine.decode(tokens, positions)
        self.decode_steps += 1
        drawn = sample_rows(logits, [s.params for s in self.decoding], [s._gen for s in self.decoding])
        done = [i for i, seq in enumerate(self.decoding) if self._sample(seq, logits[i:i + 1], SeqEvent(), drawn[i])]
        self._remove(done)

    def _sample(self, seq: Sequence, logits: Tensor, event: SeqEvent, token: int | None = None) -> bool:
        """Pick the next token for ``seq`` from logits [1, V] (unless ``sample_rows`` drew it: ``token``);
        emit it; return whether the sequence ended."""
        p = seq.params
        history = None
        if p.repetition_penalty != 1.0:
            history = torch.tensor(seq.prompt + seq.generated, dtype=torch.long, device=logits.device)
        if p.presence_penalty or p.frequency_penalty:
            out = torch.tensor(seq.generated, dtype=torch.long, device=logits.device)
            logits = apply_openai_penalties(logits[0], out, p.presence_penalty, p.frequency_penalty)[None]
        if token is None:
            token = sample_token(logits[0], p, history, seq._gen)
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.generated.append(token)
        self.generation_tokens_total += 1
        if seq.logprobs is not None:
            row = logits if history is None else apply_repetition_penalty(logits[0], history, p.repetition_penalty)[None]
            event.logprobs = token_logprobs(row, torch.tensor([token], device=logits.device), seq.logprobs)
        event.token_ids = [token]
        if token in self.engine.eos_ids and not p.ignore_eos:
            event.finish_reason = "stop"
            event.token_ids, event.logprobs = [], []  # the end-of-turn token is not part of the answer
            seq.generated.pop()
        else:
            text, hit = seq._stopper.push(seq.decoder.push(token) if seq.decoder else "")
            event.text = text
            if hit:
                event.finish_reason = "stop"
                seq._stopped_by_string = True
            elif len(seq.generated) >= p.max_new_tokens:
                event.finish_reason = "length"
            elif len(seq.prompt) + len(seq.generated) >= self.engine.max_seq_len:
                event.finish_reason = "length"
        if event.finish_reason is None:
            self._emit(seq, event)
            return False
        if not seq._stopped_by_string and seq.decoder is not None:  # flush held-back text
            tail, _ = seq._stopper.push(seq.decoder.flush())
            event.text += tail + seq._stopper.flush()
        self._emit_final(seq, event)
        return True

    def _reuse_prefix(self, seq: Sequence, slot: int, whole: bool = False) -> int:
        """Put the longest cached prefix of ``seq.prompt`` (at most all but its last token, or all of it
        with ``whole``) into ``slot``; returns its length (prefill starts there). Sequences that want prompt
        logprobs compute all."""
        best, src = self._cached_prefix(seq, slot, whole)
        in_place = best and src == slot and len(self.engine.slot_tokens[slot]) == best  # nothing else to lose
        if best and src > slot:  # a free slot: swap, so what ``slot`` cached moves there instead of being lost
            self._swap_slots(src, slot)
        elif not in_place:  # ``slot`` gets overwritten past the prefix: park what it caches first (also when
            self._park(slot)  # it shares only a system prompt with ``seq``), then copy the prefix from where it is
            best, src = self._cached_prefix(seq, slot, whole)
            if best and src != slot:
                self._copy_kv(src, slot, best)
                self._touch(src)
        self._touch(slot)
        self.engine.slot_tokens[slot] = seq.prompt[:best]
        seq.prefilled = best
        self.prompt_tokens_cached_total += best
        return best

    def _remove(self, indices: list[int]) -> None:
        """Take finished rows out of the decoding block, keeping it contiguous from slot 0."""
        if not indices:
            return
        old_d = len(self.decoding)
        for i in sorted(indices, reverse=True):
            last = len(self.decoding) - 1
            seq = self.decoding[i]
            # its KV stays cached, answer included (a later turn may reuse it): in place when it is the last
            # row, else swapped with the last row, which moves into the hole
            self.engine.slot_tokens[i] = seq.prompt + seq.generated[:-1]
            self._touch(i)
            if i != last:
                moved = self.decoding[last]
                self.engine.slot_tokens[last] = (moved.prompt + moved.generated)[:moved.length]
                self._swap_slots(last, i)
                self.decoding[i] = moved
            self.decoding.pop()
        new_d = len(self.decoding)
        if self.prefilling is not None and self.prefilling.prefilled > 0 and new_d != old_d:
            self.engine.slot_tokens[old_d] = self.prefilling.prompt[:self.prefilling.prefilled]
            self._swap_slots(old_d, new_d)

    def _touch(self, slot: int) -> None:
        self._tick += 1
        self.slot_stamp[slot] = self._tick

    def _park(self, slot: int) -> None:
        """Move what ``slot`` caches into the least recently used parking slot (past ``max_batch``), unless
        that one holds something more recent."""
        toks, stamp = self.engine.slot_tokens, self.slot_stamp
        parking = range(self.max_batch, self.engine.max_batch)
        if not parking or not toks[slot]:
            return
        j = min(parking, key=lambda i: stamp[i] if toks[i] else -1)
        if not toks[j] or stamp[j] < stamp[slot]:
            self._swap_slots(slot, j)

    def _swap_slots(self, a: int, b: int) -> None:
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

    def _copy_kv(self, src: int, dst: int, length: int) -> None:
        for layer in self.engine.model.layers:
            cache = layer.attention.kv_cache
            cache.k_cache[dst, :, :length] = cache.k_cache[src, :, :length]
            cache.v_cache[dst, :, :length] = cache.v_cache[src, :, :length]

    def _emit(self, seq: Sequence, event: SeqEvent) -> None:
        event.prompt_tokens = len(seq.prompt)
        event.completion_tokens = len(seq.generated)
        try:
            seq.sink(event)
        except Exception:  # a broken consumer must not take the loop down
            seq.cancelled = True

    def _emit_final(self, seq: Sequence, event: SeqEvent) -> None:
        seq.finished = True
        self.requests_finished += 1
        self._emit(seq, event)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if not seq.finished:
            self._emit_final(seq, SeqEvent(finish_reason=reason, error=error))
