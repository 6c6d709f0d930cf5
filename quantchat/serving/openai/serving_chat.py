"""``POST /v1/chat/completions``: messages -> one worker request per choice -> chunks or a response."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from quantchat.serving.backend import Backend, served_model
from quantchat.serving.metrics import Metrics
from quantchat.serving.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    Usage,
)
from quantchat.serving.openai.streaming import Choice, Delta, respond, start_all


def chat_logprobs(entries: list[dict[str, Any]], top: int) -> ChatLogprobs:
    def one(tok: str, lp: float | None) -> dict[str, Any]:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    return ChatLogprobs(content=[
        ChatTokenLogprob(**one(e["token"], e["logprob"]),
                         top_logprobs=[TopLogprob(**one(t, v)) for t, v in e["top"][:top]])
        for e in entries])


@dataclass
class ChatRenderer:
    id: str
    created: int
    model: str
    n: int
    top: int | None  # top_logprobs when logprobs are asked for, else None

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def head(self) -> list[ChatCompletionChunk]:
        return [self.chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(self.n)]

    def chunks(self, d: Delta) -> list[ChatCompletionChunk]:
        lp = chat_logprobs(d.logprobs, self.top) if self.top is not None and d.logprobs else None
        out = []
        if d.text or lp:
            out.append(self.chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text), logprobs=lp)]))
        if d.finish_reason:
            out.append(self.chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(),
                                                   finish_reason=d.finish_reason)]))
        return out

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self.chunk([], usage)

    def response(self, choices: list[Choice], usage: Usage) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                       logprobs=None if self.top is None else chat_logprobs(c.logprobs, self.top))
            for c in choices])


async def create_chat_completion(body: ChatCompletionRequest, request: Request, backend: Backend,
                                 metrics: Metrics) -> Response:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}  # BadRequestError
                for m in body.messages]
    top = (body.top_logprobs or 0) if body.logprobs else None
    reqs = [body.generate_request(i, messages=messages, max_tokens=body.limit(),
                                  add_generation_prompt=body.add_generation_prompt, logprobs=top)
            for i in range(body.n)]
    streams = await start_all(backend, body.model, reqs)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    r = ChatRenderer(rid, created, await served_model(backend, body.model), body.n, top)
    return await respond(request, streams, r, metrics, stream=body.stream, include_usage=body.include_usage(),
                         n=body.n)
