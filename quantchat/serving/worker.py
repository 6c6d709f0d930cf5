"""A model worker: one loaded model, its continuous-batching scheduler, and the request preparation.

``Worker`` turns a ``GenerateRequest`` (chat messages, prompt text or token ids) into a scheduled
sequence and streams plain-dict events back; the same dicts travel over HTTP when the worker runs
as its own process (``worker_app``), so the API server works the same with a local or a remote one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from quantchat.engine.generate import Engine
from quantchat.engine.scheduler import Scheduler
from quantchat.engine.sequence import SeqEvent, Sequence, TokenLogprob
from quantchat.errors import BadRequestError, ContextLengthError, QuantchatError
from quantchat.sampling.constraints import Constraint
from quantchat.sampling.sampling import SamplingParams
from quantchat.serving.tools import prepare_messages
from quantchat.serving.protocol import GenerateRequest


class Worker:
    def __init__(self, engine: Engine, model_name: str, max_queue: int = 64, template: str | None = None,
                 max_batch: int | None = None) -> None:
        """``max_batch``: sequences decoded together (default: every KV slot of ``engine``; its other slots
        park finished conversations for prefix reuse, see quantchat/engine/scheduler.py)."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.template = template
        self.scheduler = Scheduler(engine, max_queue=max_queue, max_batch=max_batch).start()
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        # events from the scheduler thread, per event loop, handed over in one wake-up per decode step
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, SeqEvent]]] = {}
        self._pending_lock = threading.Lock()

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def close(self) -> None:
        self.scheduler.stop()

    # -- preparation ----------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt for ``messages`` (with ``tools`` offered: quantchat/serving/tools.py)."""
        try:
            source = self.tokenizer.resolve_chat_template(self.template)
            messages, context = prepare_messages(messages, tools, source)
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      template=source, **context)
        except QuantchatError as e:
            raise BadRequestError(str(e), "messages") from None
        return self.tokenizer.encode(text)

    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        given = [x is not None for x in (req.prompt_ids, req.prompt, req.messages)]
        if sum(given) != 1:
            raise BadRequestError("give exactly one of prompt, prompt token ids or messages")
        if req.messages is not None:
            return self.render_chat(req.messages, req.add_generation_prompt, req.tools)
        if req.prompt is not None:
            return self.tokenizer.encode(req.prompt)
        ids = list(req.prompt_ids or [])
        vocab = self.engine.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise BadRequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
        return ids

    def prepare(self, req: GenerateRequest) -> tuple[list[int], SamplingParams]:
        ids = self.prompt_ids(req)
        if not ids:
            raise BadRequestError("the prompt is empty", "prompt")
        n_ctx = self.max_seq_len
        room = n_ctx - len(ids)
        max_new = req.max_tokens if req.max_tokens is not None else room
        if room < (1 if req.max_tokens is None else 0) or max_new > room:
            raise ContextLengthError(
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{len(ids) + (max_new if req.max_tokens is not None else 1)} tokens ({len(ids)} in the prompt, "
                f"{max_new if req.max_tokens is not None else 'at least 1'} for the completion). "
                "Please reduce the prompt or max_tokens."
            )
        try:
            params = SamplingParams(
                temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, seed=req.seed, max_new_tokens=max_new,
                stop=list(req.stop), ignore_eos=req.ignore_eos,
                constraint=None if req.constraint is None else Constraint.from_dict(req.constraint),
            )
        except QuantchatError as e:
            raise BadRequestError(str(e)) from None
        return ids, params

    # -- generation -----------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        """Validate and queue ``req`` (errors raise here, before any event); return its event stream."""
        ids, params = self.prepare(req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SeqEvent] = asyncio.Queue()

        def sink(ev: SeqEvent) -> None:
            self._deliver(loop, queue, ev)

        seq = Sequence(ids, params, sink, logprobs=req.logprobs,
                       prompt_logprobs=req.echo and req.logprobs is not None,
                       decoder=self.tokenizer.stream_decoder(skip_special_tokens=True))
        self.scheduler.submit(seq)
        return EventStream(self, seq, queue, echo_text=self.echo_text(req, ids))

    def _deliver(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, ev: SeqEvent) -> None:
        """Queue ``ev`` for ``loop`` (any thread); the loop is woken once for all events queued meanwhile."""
        with self._pending_lock:
            items = self._pending.get(loop)
            if items is not None:  # a wake-up is already on its way
                items.append((queue, ev))
                return
            self._pending[loop] = [(queue, ev)]
        try:
            loop.call_soon_threadsafe(self._drain, loop)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            with self._pending_lock:
                self._pending.pop(loop, None)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._pending_lock:
            items = self._pending.pop(loop, [])
        for queue, ev in items:
            queue.put_nowait(ev)

    def echo_text(self, req: GenerateRequest, ids: list[int]) -> str | None:
        """The prompt as echoed: a text prompt as given, token ids decoded."""
        if not req.echo:
            return None
        return req.prompt if req.prompt is not None else self.tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    def _lp(self, lp: TokenLogprob) -> dict[str, Any]:
        return {"id": lp.token_id, "token": self.token_text(lp.token_id), "logprob": lp.logprob,
                "top": [[self.token_text(i), v] for i, v in lp.top]}

    def event_dict(self, ev: SeqEvent) -> dict[str, Any]:
        return {
            "text": ev.text,
            "token_ids": ev.token_ids,
            "logprobs": [self._lp(x) for x in ev.logprobs],
            "prompt_logprobs": None if ev.prompt_logprobs is None else [self._lp(x) for x in ev.prompt_logprobs],
            "finish_reason": ev.finish_reason,
            "error": ev.error,
            "prompt_tokens": ev.prompt_tokens,
            "completion_tokens": ev.completion_tokens,
        }

    # -- small services -------------------------------------------------------------------
    def tokenize(self, prompt: str | None, messages: list[dict[str, str]] | None,
                 add_special_tokens: bool = True) -> list[int]:
        if (prompt is None) == (messages is None):
            raise BadRequestError("give exactly one of prompt or messages")
        if messages is not None:
            return self.render_chat(messages)
        return self.tokenizer.encode(prompt, add_bos=None if add_special_tokens else False)

    def detokenize(self, tokens: list[int]) -> str:
        vocab = self.engine.model.config.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise BadRequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "tokens")
        return self.tokenizer.decode(tokens)

    def status(self) -> dict[str, Any]:
        return {"model": self.model_name, "max_model_len": self.max_seq_len, "created": self.created,
                "error": self.scheduler.error, **self.scheduler.stats()}


class EventStream:
    """The events of one scheduled sequence as an async iterator; closing it (or dropping out of the
    loop) cancels the sequence, even before the first event was read."""

    def __init__(self, worker: Worker, seq: Sequence, queue: asyncio.Queue, echo_text: str | None) -> None:
        self.worker, self.seq, self.queue, self.echo_text = worker, seq, queue, echo_text
        self.first, self.done = True, False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.done:
            raise StopAsyncIteration
        try:
            ev = await self.queue.get()
        except BaseException:
            self.seq.cancel()
            raise
        out = self.worker.event_dict(ev)
        if self.first:
            out["prompt_text"] = self.echo_text
            self.first = False
        if ev.finish_reason is not None:
            self.done = True
        return out

    async def aclose(self) -> None:
        self.done = True
        if not self.seq.finished:
            self.seq.cancel()
