"""The engine: a loaded model's prefill and decode steps over its KV-cache slots, and generation.

``Engine.generate`` (one prompt, streamed), ``Engine.generate_batch`` (several prompts together) and
``ChatSession`` (a multi-turn conversation) all drive the one generation loop, ``Scheduler.step``
(engine/scheduler.py), the loop the server runs: the same sampling, penalties, stop rules and prefix reuse
(a chat's earlier turns, a shared system prompt are not computed again) on every path. When a server thread
runs the engine's scheduler, they submit to it and wait; otherwise they step it here.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from quantchat.engine.allocator import keep_freed_memory
from quantchat.engine.fused_decode import FusedDecoder
from quantchat.engine.scheduler import Scheduler
from quantchat.engine.sequence import SeqEvent, Sequence
from quantchat.errors import ContextLengthError, QuantchatError
from quantchat.model.transformer import Transformer
from quantchat.sampling.constraints import ConstraintCompiler
from quantchat.sampling.sampling import SamplingParams

PREFILL_CHUNK = 512


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was re-used, not recomputed
    generated_tokens: int = 0
    ttft_s: float = 0.0  # start to first sampled token (prefill + sampling)
    decode_s: float = 0.0  # first token to the last one
    finish_reason: str = ""  # OpenAI's: "stop" | "length" | ...
    end: str = ""  # what ended it: "eos" | "stop_string" | "max_tokens" | "context" | "grammar" | "dead_end"

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"[prompt {self.prompt_tokens} tok ({self.cached_tokens} cached), generated {self.generated_tokens} tok, "
            f"{self.decode_tokens_per_s:.1f} tok/s, first token {self.ttft_s * 1000:.0f} ms, "
            f"stop: {self.finish_reason}{f' ({self.end})' if self.end else ''}]"
        )


@dataclass
class GenerationChunk:
    """One streamed step: the new token (None at the final flush) and the text it completed."""

    token: int | None
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    finished: bool = False


class Engine:
    def __init__(self, model: Transformer, tokenizer, max_seq_len: int | None = None, max_batch: int = 1,
                 compile: bool = False, fused: bool = True, kv_dtype: torch.dtype | None = None) -> None:
        """``kv_dtype``: the KV cache's element type (default: the model's; see quantchat/kvcache)."""
        self.model = model
        self.tokenizer = tokenizer
        if model.device.type == "cpu":
            keep_freed_memory()  # per-token temporaries would page-fault in afresh every step otherwise
        cfg = model.config
        limit = cfg.max_position_embeddings
        self.max_seq_len = min(max_seq_len or limit, limit)
        self.max_batch = max_batch
        model.setup_caches(max_batch, self.max_seq_len, kv_dtype)
        self.device = model.device
        self.eos_ids: set[int] = set(getattr(tokenizer, "eos_ids", set()) or set()) | set(cfg.eos_token_ids)
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # token ids whose KV is in each slot
        # decode runs through torch.compile when asked (fewer, fused kernels per token); prefill stays eager
        self.compiled = compile
        self._decode_forward = torch.compile(model.forward, dynamic=True) if compile else model.forward
        # decode runs as one C++ call per step when the model qualifies (engine/fused_decode.py)
        self.fused = FusedDecoder.build(model) if fused and not compile else None
        self.scheduler: Scheduler | None = None  # the generation loop over these slots (set by Scheduler)
        self._constraints: ConstraintCompiler | None = None

    @property
    def constraints(self) -> ConstraintCompiler:
        """Compiles structured-output constraints for this tokenizer (made on first use: ~0.2 s)."""
        if self._constraints is None:
            self._constraints = ConstraintCompiler(self.tokenizer, self.model.config.vocab_size, self.eos_ids)
        return self._constraints

    def warmup(self) -> float:
        """Run a prefill and two decode steps (triggers compilation); returns the seconds it took."""
        t0 = time.perf_counter()
        self.prefill([0, 0], slot=0)
        B = self.max_batch
        for p in (2, 3):
            self.decode(torch.zeros(B, dtype=torch.long, device=self.device), torch.full((B,), p, device=self.device))
        self.slot_tokens = [[] for _ in range(B)]
        return time.perf_counter() - t0

    # -- model steps -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens: list[int], slot: int = 0, start_pos: int = 0) -> Tensor:
        """Run ``tokens`` at positions start_pos.. into ``slot``; return the last position's logits [V]."""
        if not tokens:
            raise ValueError("prefill needs at least one token")
        end = start_pos + len(tokens)
        if end > self.max_seq_len:
            raise ContextLengthError(
                f"prompt of {end} tokens does not fit the context window of {self.max_seq_len} tokens"
            )
        self.check_ids(tokens)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        logits = None
        for s in range(0, len(tokens), PREFILL_CHUNK):
            chunk = ids[s:s + PREFILL_CHUNK][None]
            pos = torch.arange(start_pos + s, start_pos + s + chunk.shape[1], device=self.device)[None]
            logits = self.model(chunk, pos, kv_len=start_pos + s + chunk.shape[1], slot=slot, last_only=True)
        self.slot_tokens[slot] = self.slot_tokens[slot][:start_pos] + list(tokens)
        return logits[0, -1]

    @torch.inference_mode()
    def decode(self, tokens: Tensor, positions: Tensor, slot: int | None = None) -> Tensor:
        """One decode step: tokens [B] at positions [B] for slots 0..B-1 (or the one ``slot``); logits [B, V]."""
        kv_len = int(positions.max()) + 1
        if kv_len > self.max_seq_len:
            raise ContextLengthError(f"context window of {self.max_seq_len} tokens is full")
        if self.fused is not None and not self.fused.matches(self.model):  # new KV cache or swapped layers
            self.fused = FusedDecoder.build(self.model)
        if self.fused is not None:
            return self.fused.step(tokens, positions, 0 if slot is None else slot)
        return self._decode_forward(tokens[:, None], positions[:, None], kv_len=kv_len, slot=slot)[:, -1]

    # -- generation --------------------------------------------------------------------------
    def check_ids(self, tokens: list[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise QuantchatError(
                f"token id {bad[0]} is outside the model's vocabulary of {self.model.config.vocab_size} "
                "(the tokenizer does not match the model)"
            )

    def check_prompt(self, tokens: list[int]) -> None:
        """Raise a clear error for a prompt that cannot run: too long, empty, or with unknown ids."""
        self.check_fits(len(tokens))
        self.check_ids(tokens)

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt >= self.max_seq_len:
            raise ContextLengthError(
                f"prompt is {n_prompt} tokens; the context window is {self.max_seq_len} tokens "
                "(leave room for at least one new token)"
            )
        if n_prompt == 0:
            raise QuantchatError("empty prompt")

    # -- generation: drives the one loop ------------------------------------------------------
    def loop(self) -> Scheduler:
        """The engine's scheduler (a default one over every slot when none was made)."""
        return self.scheduler if self.scheduler is not None else Scheduler(self)

    def run(self, seqs: list[Sequence]) -> Iterator[tuple[Sequence, SeqEvent]]:
        """Submit ``seqs`` to the loop and yield (sequence, event) as they come, until all finished."""
        sch = self.loop()
        events: queue.SimpleQueue[tuple[Sequence, SeqEvent]] = queue.SimpleQueue()
        for seq in seqs:
            seq.sink = lambda ev, seq=seq: events.put((seq, ev))
        submitted: list[Sequence] = []
        try:
            for seq in seqs:
                submitted.append(sch.submit(seq, queue_limit=False))
            left = len(seqs)
            while left:
                if sch.running:  # a server thread steps the loop
                    item = events.get(timeout=None)
                else:
                    while events.empty():
                        if sch.error is not None:
                            raise QuantchatError(f"the generation loop failed: {sch.error}")
                        try:
                            sch.step()
                        except Exception as e:
                            sch.fail(e)
                            raise
                    item = events.get()
                left -= item[1].finish_reason is not None
                yield item
        finally:  # a consumer that stops early (Ctrl-C, break) frees its slots
            unfinished = [s for s in submitted if not s.finished]
            for seq in unfinished:
                seq.cancel()
            if unfinished and not sch.running:
                sch.step()

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[GenerationChunk]:
        """Stream the continuation of ``prompt`` token by token (text pieces never split a character); the
        longest prefix of ``prompt`` some slot caches is not recomputed."""
        self.check_fits(len(prompt))
        seq = Sequence(list(prompt), params, sink=lambda ev: None,
                       decoder=self.tokenizer.stream_decoder(skip_special_tokens=True))
        stats = GenerationStats(prompt_tokens=len(prompt))
        for _, ev in self.run([seq]):
            if ev.error:
                raise QuantchatError(f"generation failed: {ev.error}")
            stats.cached_tokens = seq.cached_tokens
            stats.generated_tokens = seq.sampled_tokens
            if seq.first_token_at is not None:
                stats.ttft_s = seq.first_token_at - seq.submitted_at
                stats.decode_s = time.perf_counter() - seq.first_token_at
            stats.finish_reason, stats.end = ev.finish_reason or "", seq.end or ""
            if ev.token_ids and ev.finish_reason is not None:  # the last token, then the final flush apart
                yield GenerationChunk(ev.token_ids[0], "", stats)
                yield GenerationChunk(None, ev.text, stats, finished=True)
            else:
                yield GenerationChunk(ev.token_ids[0] if ev.token_ids else None, ev.text, stats,
                                      finished=ev.finish_reason is not None)

    def generate_text(self, prompt: list[int], params: SamplingParams) -> tuple[str, GenerationStats]:
        pieces, stats = [], GenerationStats()
        for chunk in self.generate(prompt, params):
            pieces.append(chunk.text)
            stats = chunk.stats
        return "".join(pieces), stats

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Generate for several prompts of different lengths together; returns each one's new token ids
        (prompt ``i`` samples with seed ``params.seed + i``)."""
        for p in prompts:
            self.check_fits(len(p))
        seqs = [Sequence(list(p), params if params.seed is None else dataclasses.replace(params, seed=params.seed + i),
                         sink=lambda ev: None) for i, p in enumerate(prompts)]
        outputs: dict[int, list[int]] = {id(s): [] for s in seqs}
        for seq, ev in self.run(seqs):
            if ev.error:
                raise QuantchatError(f"generation failed: {ev.error}")
            outputs[id(seq)] += ev.token_ids
        return [outputs[id(s)] for s in seqs]


class ChatSession:
    """A multi-turn chat: renders the template; the loop's prefix reuse keeps earlier turns' KV cache."""

    def __init__(self, engine: Engine, params: SamplingParams, system_prompt: str | None = None,
                 template: str | None = None) -> None:
        self.engine, self.params, self.template = engine, params, template
        self.system_prompt = system_prompt
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def prompt_ids(self) -> list[int]:
        text = self.engine.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True,
                                                         template=self.template)
        return self.engine.tokenizer.encode(text)

    def send(self, user_text: str) -> Iterator[GenerationChunk]:
        """Add a user turn and stream the assistant's answer; the answer joins the history."""
        self.messages.append({"role": "user", "content": user_text})
        try:
            ids = self.prompt_ids()
            self.engine.check_fits(len(ids))
        except QuantchatError:
            self.messages.pop()
            raise
        pieces = []
        for chunk in self.engine.generate(ids, self.params):
            pieces.append(chunk.text)
            yield chunk
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})
