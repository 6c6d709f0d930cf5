"""The one loop behind chat and completions: drive a backend's event streams (one per choice), then send
SSE chunks as events come or collect the whole response.

A ``Renderer`` (one per endpoint) turns what each event adds into chunks, and the collected choices into
the response; everything else (n choices, echo, usage, finish reasons, errors, disconnects) is here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from quantchat.errors import QuantchatError, UnavailableError
from quantchat.serving.backend import Backend
from quantchat.serving.metrics import Metrics
from quantchat.serving.openai.errors import error_body
from quantchat.serving.openai.protocol import Usage
from quantchat.serving.protocol import GenerateRequest

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


@dataclass
class Delta:
    """What one event adds to choice ``index``."""

    index: int
    text: str
    logprobs: list[dict[str, Any]]  # entries {token, logprob, top}; the prompt's first when echoing
    text_offset: int  # characters of the choice's logprob tokens before these
    finish_reason: str | None = None
    prompt_tokens: int = 0  # set with finish_reason


@dataclass
class Choice:
    """One choice as collected so far."""

    index: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    chars: int = 0  # characters covered by logprobs

    @property
    def text(self) -> str:
        return "".join(self.texts)


class Renderer(Protocol):
    def head(self) -> list[BaseModel]: ...  # chunks before the first event
    def chunks(self, d: Delta) -> list[BaseModel]: ...
    def usage_chunk(self, usage: Usage) -> BaseModel: ...
    def response(self, choices: list[Choice], usage: Usage) -> BaseModel: ...


def sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump() if isinstance(obj, BaseModel) else obj
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def normal_finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop" if reason == "abort" else reason


async def start_all(backend: Backend, model: str | None, reqs: list[GenerateRequest]) -> list[AsyncIterator[dict]]:
    """Start every sequence, or none: if one fails validation the started ones are closed."""
    streams: list[AsyncIterator[dict]] = []
    try:
        for r in reqs:
            streams.append(await backend.generate(model, r))
    except BaseException:
        await close_all(streams)
        raise
    return streams


async def close_all(streams: list[AsyncIterator[dict]]) -> None:
    for s in streams:
        await s.aclose()


async def merged(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """Interleave several event streams as (index, event) in arrival order."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncIterator[dict]) -> None:
        try:
            async for ev in s:
                await queue.put((i, ev))
        except Exception as e:  # surfaces in the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, ev = await queue.get()
            if ev is done:
                left -= 1
            elif isinstance(ev, Exception):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            close = getattr(s, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    pass


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run ``work``; cancel it (freeing its slots) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError
    return task.result()


async def deltas(streams: list[AsyncIterator[dict]], choices: list[Choice], usage: Usage, metrics: Metrics,
                 n: int, echo: bool) -> AsyncIterator[Delta]:
    """Each event as a ``Delta``, added to its choice and to ``usage`` (choice i answers prompt i // n).

    An error event raises ``UnavailableError``; with ``echo`` a choice's first delta starts with its prompt.
    """
    async for i, ev in merged(streams):
        if ev.get("error"):
            raise UnavailableError(ev["error"])
        c = choices[i]
        text, entries = ev["text"], ev["logprobs"]
        if echo and not c.texts:
            text = (ev.get("prompt_text") or "") + text
            entries = (ev.get("prompt_logprobs") or []) + entries
        d = Delta(i, text, entries, c.chars)
        c.texts.append(text)
        c.logprobs += entries
        c.chars += sum(len(e["token"]) for e in entries)
        metrics.add_tokens(len(ev["token_ids"]))
        if ev["finish_reason"]:
            d.finish_reason = c.finish_reason = normal_finish(ev["finish_reason"])
            d.prompt_tokens = ev["prompt_tokens"]
            usage.completion_tokens += ev["completion_tokens"]
            if i % n == 0:  # each prompt once, however many choices answer it (as OpenAI's usage)
                usage.prompt_tokens += ev["prompt_tokens"]
                metrics.prompt_tokens += ev["prompt_tokens"]
        yield d


async def stream_events(streams: list[AsyncIterator[dict]], r: Renderer, metrics: Metrics, n: int, echo: bool,
                        include_usage: bool) -> AsyncIterator[str]:
    choices, usage = [Choice(i) for i in range(len(streams))], Usage()
    try:
        for chunk in r.head():
            yield sse(chunk)
        async for d in deltas(streams, choices, usage, metrics, n, echo):
            for chunk in r.chunks(d):
                yield sse(chunk)
        if include_usage:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield sse(r.usage_chunk(usage))
        yield DONE
    except QuantchatError as e:
        yield sse(error_body(str(e), "server_error", None, 500))
        yield DONE
    finally:
        await close_all(streams)


async def collect(streams: list[AsyncIterator[dict]], r: Renderer, metrics: Metrics, n: int,
                  echo: bool) -> BaseModel:
    choices, usage = [Choice(i) for i in range(len(streams))], Usage()
    async for _ in deltas(streams, choices, usage, metrics, n, echo):
        pass
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return r.response(choices, usage)


async def respond(request: Request, streams: list[AsyncIterator[dict]], r: Renderer, metrics: Metrics, *,
                  stream: bool, include_usage: bool, n: int, echo: bool = False) -> Response:
    """SSE chunks as the events come (``stream``), else the whole response once every choice is done."""
    if stream:
        return StreamingResponse(stream_events(streams, r, metrics, n, echo, include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        return JSONResponse((await until_disconnect(request, collect(streams, r, metrics, n, echo))).model_dump())
    finally:
        await close_all(streams)
