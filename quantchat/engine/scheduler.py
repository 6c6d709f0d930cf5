"""The generation loop: continuous batching, sequences joining and leaving the batch at every step.

This is quantchat's one loop. The server runs it on a background thread (``start``); ``Engine.generate``,
``Engine.generate_batch`` and the terminal chat drive the same ``step`` inline, so sampling parameters,
stop rules, penalties and prefix reuse mean the same on every path.

Decoding sequences sit in KV slots ``0..d-1`` (a decode step is one batched forward over a contiguous block
of the cache, no gather); the one long prompt being prefilled sits in slot ``d`` and is prefilled a chunk
at a time between decode steps, so it never stalls the others for long. Short prompts waiting together are
prefilled together (``batching``: right-padded forwards into slots ``d, d+1, ...``). Prompts start from the
longest prefix some slot caches (``prefix_cache``). When a sequence finishes (or its client goes away) the
last decoding slot swaps places with it, so the finished conversation stays cached for its next turn. KV
slots are allocated once (``Engine(max_batch=...)``), never per request.

Each ``Sequence`` carries its own sampling parameters, stop strings, token limit and seed; its events
(text, token ids, log-probabilities, finish reason) go to a callback, usually a queue fed across threads.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from quantchat.engine import batching
from quantchat.engine.batching import split_padded
from quantchat.engine.prefix_cache import PROMPT_LOGITS_KEPT, PrefixCache
from quantchat.engine.sequence import SeqEvent, Sequence, TokenLogprob, token_logprobs
from quantchat.engine.stopping import StopStringMatcher
from quantchat.errors import QueueFullError
from quantchat.sampling.constraints import apply_masks
from quantchat.sampling.sampling import (
    apply_openai_penalties,
    apply_repetition_penalty,
    make_generator,
    sample_rows,
    sample_token,
)

if TYPE_CHECKING:
    from quantchat.engine.generate import Engine

__all__ = ["PROMPT_LOGITS_KEPT", "Scheduler", "SeqEvent", "Sequence", "TokenLogprob", "split_padded"]


class Scheduler:
    """Runs an ``Engine``'s slots as a continuously batched loop (inline with ``step`` or on a thread).
    The newest scheduler of an engine is ``engine.scheduler``: the one its ``generate`` drives."""

    def __init__(self, engine: Engine, max_queue: int = 64, max_batch: int | None = None) -> None:
        """``max_batch``: sequences decoded together (default: every slot of the engine); the engine's
        other slots park finished conversations for prefix reuse."""
        self.engine = engine
        self.max_batch = max_batch or engine.max_batch
        if not 1 <= self.max_batch <= engine.max_batch:
            raise ValueError(f"max_batch {self.max_batch} outside the engine's 1..{engine.max_batch} slots")
        self.prefix = PrefixCache(engine, self.max_batch)
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
        self.constraint_seconds = 0.0  # structured output's share of decode: masks and matcher updates
        self.started_at = time.time()
        engine.scheduler = self

    @property
    def prompt_tokens_cached_total(self) -> int:
        return self.prefix.cached_tokens_total

    @property
    def prompt_logits(self) -> collections.OrderedDict[tuple[int, ...], Tensor]:
        return self.prefix.prompt_logits

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

    def submit(self, seq: Sequence, queue_limit: bool = True) -> Sequence:
        """Queue ``seq`` (``queue_limit``: refuse it when ``max_queue`` wait already; in-process callers such
        as ``Engine.generate`` wait their turn instead)."""
        self.engine.check_prompt(seq.prompt)
        if seq.params.constraint is not None and seq.matcher is None:  # a bad constraint raises here
            seq.matcher = self.engine.constraints.matcher(seq.params.constraint)
        with self.cond:
            if queue_limit and len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self.waiting.append(seq)
            self.requests_total += 1
            self.cond.notify_all()
        return seq

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.decoding or self.prefilling)

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
            "constraint_seconds_total": self.constraint_seconds,
            "prompt_tokens_cached_total": self.prompt_tokens_cached_total,
        }

    # -- the loop -----------------------------------------------------------------------------
    def step(self) -> None:
        """One turn of the loop: drop cancelled sequences, admit and prefill waiting ones, one decode step.
        Only one thread may step a scheduler: its own (``start``) or the caller's, not both."""
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
                    while self.running and not self.busy:
                        self.cond.wait(timeout=1.0)
                    if not self.running:
                        break
                self.step()
        except Exception as e:  # the model failed: fail every request rather than hang them
            self.fail(e)
            raise

    def fail(self, e: BaseException) -> None:
        """End every sequence with an error (the model failed)."""
        self.error = f"{type(e).__name__}: {e}"
        for seq in [*self.decoding, *([self.prefilling] if self.prefilling else []), *self.waiting]:
            self._finish(seq, "error", error=self.error)
        self.decoding, self.prefilling = [], None
        self.waiting.clear()
        self.running = False

    def _admit(self) -> list[Sequence]:
        """Start the next waiting sequence (its prefill runs chunk by chunk), or return a group of
        waiting short prompts to prefill together now."""
        with self.cond:
            if self.prefilling is not None:
                return []
            long, group = batching.take_admissions(self.waiting, self.max_batch - len(self.decoding),
                                                   batching.PREFILL_STEP)
        for seq in ([long] if long else group):
            self._start(seq)
        if long is not None:
            self.prefix.reuse(long, len(self.decoding))
            self.prefilling = long
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
            if self.prefix.whole_prompt_cached(seq):
                self._start_cached(seq)
            elif key in seen:  # the same prompt twice in the group (n choices): computed once
                repeats.append(seq)
            else:
                seen.add(key)
                rest.append(seq)
        new = [len(s.prompt) - self.prefix.longest(s)[0] for s in rest]
        order = sorted(range(len(rest)), key=lambda i: new[i])
        for lo, hi in split_padded([new[i] for i in order]):
            self._prefill_rows([rest[i] for i in order[lo:hi]])
        for seq in repeats:
            if self.prefix.whole_prompt_cached(seq):
                self._start_cached(seq)
            else:  # its twin finished at once and its slot was taken again
                self._prefill_rows([seq])

    def _start_cached(self, seq: Sequence) -> None:
        """Start ``seq`` in slot d from a slot holding its whole prompt and its kept first-token logits."""
        d = len(self.decoding)
        self.prefix.reuse(seq, d, whole=True)
        self.decoding.append(seq)
        if self._first_token(seq, self.prefix.kept_logits(seq)[None], SeqEvent(prompt_tokens=len(seq.prompt))):
            self._remove([d])

    @torch.inference_mode()
    def _prefill_rows(self, group: list[Sequence]) -> None:
        """Prefill short prompts in one forward (right-padded; the padding's KV lands past each prompt's
        end, where the sequence's own tokens overwrite it before anything reads it), into slots d.."""
        d, dev = len(self.decoding), self.engine.device
        starts = [self.prefix.reuse(seq, d + i) for i, seq in enumerate(group)]
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
            self.prefix.remember(seq, logits[i])
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
        if seq.matcher is not None:  # a copy: the prefix cache keeps these logits for the next asker
            logits = logits.clone()
            apply_masks(logits, [0], [seq.matcher])
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
        step = batching.PREFILL_STEP if self.decoding else max(batching.PREFILL_STEP, batching.PREFILL_STEP_ALONE)
        chunk = seq.prompt[start:start + step]
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
        self.prefix.remember(seq, logits[-1])
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
        rows = [i for i, s in enumerate(self.decoding) if s.matcher is not None]
        if rows:  # structured output: refused tokens to -inf, in place, before any sampling rule
            t0 = time.perf_counter()
            apply_masks(logits, rows, [self.decoding[i].matcher for i in rows])
            self.constraint_seconds += time.perf_counter() - t0
        drawn = sample_rows(logits, [s.params for s in self.decoding], [s._gen for s in self.decoding])
        done = [i for i, seq in enumerate(self.decoding) if self._sample(seq, logits[i:i + 1], SeqEvent(), drawn[i])]
        self._remove(done)

    def _sample(self, seq: Sequence, logits: Tensor, event: SeqEvent, token: int | None = None) -> bool:
        """Pick the next token for ``seq`` from logits [1, V] (unless ``sample_rows`` drew it: ``token``);
        emit it; return whether the sequence ended."""
        p = seq.params
        if seq.matcher is not None and seq.matcher.dead:  # the constraint admits no token: end it here
            seq.end, event.finish_reason = "dead_end", "grammar_dead_end"
            if seq.decoder is not None:  # flush held-back text
                tail, _ = seq._stopper.push(seq.decoder.flush())
                event.text += tail + seq._stopper.flush()
            self._emit_final(seq, event)
            return True
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
            event.finish_reason, seq.end = "stop", "eos"
            event.token_ids, event.logprobs = [], []  # the end-of-turn token is not part of the answer
            seq.generated.pop()
        else:
            text, hit = seq._stopper.push(seq.decoder.push(token) if seq.decoder else "")
            event.text = text
            if hit:
                event.finish_reason, seq.end = "stop", "stop_string"
            elif seq.matcher is not None and not self._advance(seq.matcher, token):  # not under the mask
                event.finish_reason, seq.end = "grammar_dead_end", "dead_end"
            elif seq.matcher is not None and seq.matcher.done:
                event.finish_reason, seq.end = "stop", "grammar"
            elif len(seq.generated) >= p.max_new_tokens:
                event.finish_reason, seq.end = "length", "max_tokens"
            elif len(seq.prompt) + len(seq.generated) >= self.engine.max_seq_len:
                event.finish_reason, seq.end = "length", "context"
        if event.finish_reason is None:
            self._emit(seq, event)
            return False
        if seq.end != "stop_string" and seq.decoder is not None:  # flush held-back text
            tail, _ = seq._stopper.push(seq.decoder.flush())
            event.text += tail + seq._stopper.flush()
        self._emit_final(seq, event)
        return True

    def _advance(self, matcher, token: int) -> bool:
        t0 = time.perf_counter()
        ok = matcher.advance(token)
        self.constraint_seconds += time.perf_counter() - t0
        return ok

    def _remove(self, indices: list[int]) -> None:
        """Take finished rows out of the decoding block, keeping it contiguous from slot 0."""
        if not indices:
            return
        old_d = len(self.decoding)
        toks = self.engine.slot_tokens
        for i in sorted(indices, reverse=True):
            last = len(self.decoding) - 1
            seq = self.decoding[i]
            # its KV stays cached, answer included (a later turn may reuse it): in place when it is the last
            # row, else swapped with the last row, which moves into the hole
            toks[i] = seq.prompt + seq.generated[:-1]
            self.prefix.touch(i)
            if i != last:
                moved = self.decoding[last]
                toks[last] = (moved.prompt + moved.generated)[:moved.length]
                self.prefix.swap(last, i)
                self.decoding[i] = moved
            self.decoding.pop()
        new_d = len(self.decoding)
        if self.prefilling is not None and self.prefilling.prefilled > 0 and new_d != old_d:
            toks[old_d] = self.prefilling.prompt[:self.prefilling.prefilled]
            self.prefix.swap(old_d, new_d)

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
