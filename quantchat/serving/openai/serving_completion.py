"""``POST /v1/completions``: prompt(s) -> one worker request per prompt and choice -> chunks or a response."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from quantchat.errors import BadRequestError
from quantchat.serving.backend import Backend, served_model
from quantchat.serving.metrics import Metrics
from quantchat.serving.openai.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from quantchat.serving.openai.streaming import Choice, Delta, respond, start_all


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> CompletionLogprobs:
    """OpenAI's legacy logprobs for ``entries``; text offsets count from ``offset``."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for e in entries:
        tokens.append(e["token"])
        token_logprobs.append(e["logprob"])
        top = None
        if e["logprob"] is not None:
            top = {t: v for t, v in e["top"]}
            top.setdefault(e["token"], e["logprob"])  # the sampled token is always listed
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(e["token"])
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                              text_offset=text_offset)


@dataclass
class CompletionRenderer:
    id: str
    created: int
    model: str
    logprobs: bool

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def head(self) -> list[CompletionChunk]:
        return []

    def chunks(self, d: Delta) -> list[CompletionChunk]:
        lp = completion_logprobs(d.logprobs, d.text_offset) if self.logprobs and d.logprobs else None
        if not (d.text or lp or d.finish_reason):
            return []
        return [self.chunk([CompletionChoice(index=d.index, text=d.text, logprobs=lp, finish_reason=d.finish_reason)])]

    def usage_chunk(self, usage: Usage) -> CompletionChunk:
        return self.chunk([], usage)

    def response(self, choices: list[Choice], usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason,
                             logprobs=completion_logprobs(c.logprobs) if self.logprobs else None)
            for c in choices])


async def create_completion(body: CompletionRequest, request: Request, backend: Backend, metrics: Metrics) -> Response:
    body.check_supported()
    try:
        prompts = body.prompts()
    except ValueError as e:
        raise BadRequestError(str(e), "prompt") from None
    if body.suffix:
        raise BadRequestError("suffix is not supported", "suffix")
    reqs = [body.generate_request(j, max_tokens=body.max_tokens, echo=body.echo, logprobs=body.logprobs,
                                  **({"prompt": p} if isinstance(p, str) else {"prompt_ids": p}))
            for p in prompts for j in range(body.n)]
    streams = await start_all(backend, body.model, reqs)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    r = CompletionRenderer(rid, created, await served_model(backend, body.model), body.logprobs is not None)
    return await respond(request, streams, r, metrics, stream=body.stream, include_usage=body.include_usage(),
                         n=body.n, echo=body.echo)
