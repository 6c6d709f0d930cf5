"""Generation: prefill and decode over the model's KV-cache slots, streaming text out.

``Engine`` owns a loaded model and its tokenizer. ``Engine.generate`` streams one sequence in a
slot (re-using a cached prefix when asked); ``Engine.generate_batch`` decodes several prompts of
different lengths together, one slot each. ``ChatSession`` keeps a multi-turn conversation and
re-uses the KV cache of earlier turns.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from quantchat.engine.allocator import keep_freed_memory
from quantchat.engine.stopping import StopStringMatcher
from quantchat.errors import ContextLengthError, QuantchatError
from quantchat.engine.fused_decode import FusedDecoder
from quantchat.model.llama import Transformer
from quantchat.sampling.sampling import SamplingParams, make_generator, sample_token

PREFILL_CHUNK = 512


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was re-used, not recomputed
    generated_tokens: int = 0
    ttft_s: float = 0.0  # start to first sampled token (prefill + sampling)
    decode_s: float = 0.0  # first token to the last one
    finish_reason: str = ""

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"[prompt {self.prompt_tokens} tok ({self.cached_tokens} cached), generated {self.generated_tokens} tok, "
            f"{self.decode_tokens_per_s:.1f} tok/s, first token {self.ttft_s * 1000:.0f} ms, "
            f"stop: {self.finish_reason}]"
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

    def generate(
        self, prompt: list[int], params: SamplingParams, slot: int = 0, reuse_cache: bool = False,
    ) -> Iterator[GenerationChunk]:
        """Stream the continuation of ``prompt`` token by token (text pieces never split a character).

        With ``reuse_cache`` the longest prefix of ``prompt`` already in the slot's cache is not recomputed.
        """
        params.validate()
        self.check_fits(len(prompt))
        stats = GenerationStats(prompt_tokens=len(prompt))
        start = time.perf_counter()
        cached = 0
        if reuse_cache:
            old = self.slot_tokens[slot]
            limit = min(len(old), len(prompt) - 1)
            while cached < limit and old[cached] == prompt[cached]:
                cached += 1
        stats.cached_tokens = cached
        logits = self.prefill(prompt[cached:], slot=slot, start_pos=cached)
        gen = make_generator(params.seed, self.device)
        history = torch.tensor(prompt, dtype=torch.long, device=self.device)
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        stopper = StopStringMatcher(params.stop)
        max_new = min(params.max_new_tokens, self.max_seq_len - len(prompt))
        pos = len(prompt)
        first_at = None
        if max_new <= 0:
            stats.finish_reason = "length"
            yield GenerationChunk(None, "", stats, finished=True)
            return
        while True:
            token = sample_token(logits, params, history if params.repetition_penalty != 1.0 else None, gen)
            if first_at is None:
                first_at = time.perf_counter()
                stats.ttft_s = first_at - start
            stats.generated_tokens += 1
            if token in self.eos_ids and not params.ignore_eos:
                stats.finish_reason = "stop"
                break
            text, hit = stopper.push(decoder.push(token))
            if hit:
                stats.finish_reason = "stop"
                stats.decode_s = time.perf_counter() - first_at
                yield GenerationChunk(token, text, stats, finished=True)
                return
            stats.decode_s = time.perf_counter() - first_at
            yield GenerationChunk(token, text, stats)
            if stats.generated_tokens >= max_new:
                stats.finish_reason = "length"
                break
            if params.repetition_penalty != 1.0:
                history = torch.cat([history, history.new_tensor([token])])
            logits = self.decode(torch.tensor([token], device=self.device), torch.tensor([pos], device=self.device),
                                 slot=slot)[0]
            self.slot_tokens[slot].append(token)
            pos += 1
        stats.decode_s = time.perf_counter() - first_at
        text, _ = stopper.push(decoder.flush())
        yield GenerationChunk(None, text + stopper.flush(), stats, finished=True)

    def generate_text(self, prompt: list[int], params: SamplingParams, **kw) -> tuple[str, GenerationStats]:
        pieces, stats = [], GenerationStats()
        for chunk in self.generate(prompt, params, **kw):
            pieces.append(chunk.text)
            stats = chunk.stats
        return "".join(pieces), stats

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Generate for several prompts of different lengths at once (one KV slot each); returns new token ids.

        Each prompt is prefilled into its own slot, then all live sequences decode together; a finished
        sequence keeps its slot but its output is frozen.
        """
        params.validate()
        B = len(prompts)
        if B > self.max_batch:
            raise QuantchatError(f"{B} prompts but the engine has {self.max_batch} slots")
        for p in prompts:
            self.check_fits(len(p))
        gens = [make_generator(None if params.seed is None else params.seed + i, self.device) for i in range(B)]
        logits = torch.stack([self.prefill(p, slot=i) for i, p in enumerate(prompts)])
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        limits = [min(params.max_new_tokens, self.max_seq_len - len(p)) for p in prompts]
        outputs: list[list[int]] = [[] for _ in range(B)]
        done = [lim <= 0 for lim in limits]
        while not all(done):
            next_tokens = []
            for i in range(B):
                if done[i]:
                    next_tokens.append(0)
                    continue
                tok = sample_token(logits[i], params, None, gens[i])
                if tok in self.eos_ids and not params.ignore_eos:
                    done[i] = True
                else:
                    outputs[i].append(tok)
                    done[i] = len(outputs[i]) >= limits[i]
                next_tokens.append(tok)
            if all(done):
                break
            # finished rows still step (their slot is theirs); clamp positions inside the cache
            positions = torch.clamp(positions, max=self.max_seq_len - 1)
            logits = self.decode(torch.tensor(next_tokens, device=self.device), positions)
            positions = positions + 1
        return outputs


class ChatSession:
    """A multi-turn chat in slot 0 of an engine: renders the template, re-uses earlier turns' KV cache."""

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
        for chunk in self.engine.generate(ids, self.params, slot=0, reuse_cache=True):
            pieces.append(chunk.text)
            yield chunk
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})
