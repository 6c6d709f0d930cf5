"""One sequence's state in the generation loop, and what the loop tells its consumer."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from quantchat.engine.stopping import StopStringMatcher
from quantchat.sampling.constraints import Matcher
from quantchat.sampling.sampling import SamplingParams


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
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | "grammar_dead_end"
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
    cached_tokens: int = 0  # prompt tokens whose KV was reused, not computed
    cancelled: bool = False
    finished: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    _gen: torch.Generator | None = None
    _stopper: StopStringMatcher | None = None
    _prompt_lp: list[TokenLogprob] = field(default_factory=list)
    matcher: Matcher | None = None  # the constraint's state (params.constraint), made at submit
    # why it ended: "eos" | "stop_string" | "max_tokens" | "context" | "grammar" (the constraint is complete)
    # | "dead_end" (the constraint admits no next token) (else unset)
    end: str | None = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def sampled_tokens(self) -> int:
        """Tokens the model produced, the end-of-turn token included (it is not part of ``generated``)."""
        return len(self.generated) + (self.end == "eos")

    @property
    def length(self) -> int:
        """Tokens whose KV is in the slot (prompt + generated, except the newest sampled one)."""
        return len(self.prompt) + max(0, len(self.generated) - 1) if self.generated else self.prefilled


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
