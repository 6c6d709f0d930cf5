"""``POST /v1/chat/completions``: messages -> one worker request per choice -> chunks or a response."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from quantchat.errors import BadRequestError
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
    FunctionCallOut,
    FunctionDelta,
    NamedToolChoice,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from quantchat.serving.openai.streaming import Choice, Delta, respond, start_all
from quantchat.serving.tools import ToolCall, ToolStream, forced_grammar, parse_tool_calls


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
    tool_names: set[str] = field(default_factory=set)  # tools the answer may call (parsed back out)
    _streams: dict[int, ToolStream] = field(default_factory=dict)

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def head(self) -> list[ChatCompletionChunk]:
        return [self.chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(self.n)]

    def chunks(self, d: Delta) -> list[ChatCompletionChunk]:
        lp = chat_logprobs(d.logprobs, self.top) if self.top is not None and d.logprobs else None
        text, calls = d.text, []
        if self.tool_names:  # text that may open a tool call waits until it is clearly text or a call
            ts = self._streams.setdefault(d.index, ToolStream(self.tool_names))
            text, calls = ts.push(d.text)
            if d.finish_reason:
                text += ts.flush()
        out = []
        if text or lp:
            out.append(self.chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(content=text), logprobs=lp)]))
        for call in calls:  # OpenAI's shape: id, type and name first, then the arguments
            k = len(self._streams[d.index].calls) - len(calls) + calls.index(call)
            out.append(self.chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(tool_calls=[ToolCallDelta(
                index=k, id=call.id, type="function", function=FunctionDelta(name=call.name, arguments=""))]))]))
            out.append(self.chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(tool_calls=[ToolCallDelta(
                index=k, function=FunctionDelta(arguments=call.arguments))]))]))
        if d.finish_reason:
            called = self.tool_names and self._streams[d.index].calls
            reason = "tool_calls" if called and d.finish_reason == "stop" else d.finish_reason
            out.append(self.chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(), finish_reason=reason)]))
        return out

    def message(self, c: Choice) -> tuple[AssistantMessage, str | None]:
        """The assistant message of a collected choice, tool calls parsed out, and its finish reason."""
        calls: list[ToolCall] = []
        content: str | None = c.text
        if self.tool_names:
            content, calls = parse_tool_calls(c.text, self.tool_names)
        if not calls:
            return AssistantMessage(content=c.text), c.finish_reason
        out = [ToolCallOut(id=t.id, function=FunctionCallOut(name=t.name, arguments=t.arguments)) for t in calls]
        return (AssistantMessage(content=content, tool_calls=out),
                "tool_calls" if c.finish_reason == "stop" else c.finish_reason)

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self.chunk([], usage)

    def response(self, choices: list[Choice], usage: Usage) -> ChatCompletionResponse:
        out = []
        for c in choices:
            message, reason = self.message(c)
            out.append(ChatChoice(index=c.index, message=message, finish_reason=reason,
                                  logprobs=None if self.top is None else chat_logprobs(c.logprobs, self.top)))
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage, choices=out)


def message_dicts(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as the worker renders them (developer is system; tool calls kept)."""
    out = []
    for m in body.messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": c.function.arguments}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def tool_setup(body: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, dict[str, str] | None]:
    """(the tools to offer in the prompt, the constraint that forces a call) for ``tools`` and
    ``tool_choice``: none offers nothing; auto (the default) offers them; required constrains the answer
    to calls (several with ``parallel_tool_calls``), a named function to one call of it."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise BadRequestError("tool_choice needs tools", "tool_choice")
        return None, None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise BadRequestError("two tools have the same name", "tools")
    if choice == "none":
        return None, None
    if choice in (None, "auto"):
        return tools, None
    named = isinstance(choice, NamedToolChoice)  # one call of that function
    if named:
        forced = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not forced:
            raise BadRequestError(f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice")
    else:
        forced = tools
    if body.constraint() is not None:
        raise BadRequestError("tool_choice required or named cannot be combined with response_format, regex or "
                              "grammar", "tool_choice")
    return tools, {"kind": "grammar", "spec": forced_grammar(forced, body.parallel_tool_calls and not named)}


async def create_chat_completion(body: ChatCompletionRequest, request: Request, backend: Backend,
                                 metrics: Metrics) -> Response:
    body.check_supported()
    messages = message_dicts(body)  # an unsupported content part is a BadRequestError
    tools, forced = tool_setup(body)
    top = (body.top_logprobs or 0) if body.logprobs else None
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    if forced is not None:
        extra["constraint"] = forced
    reqs = [body.generate_request(i, messages=messages, max_tokens=body.limit(),
                                  add_generation_prompt=body.add_generation_prompt, logprobs=top, **extra)
            for i in range(body.n)]
    streams = await start_all(backend, body.model, reqs)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    names = {t["function"]["name"] for t in tools} if tools else set()
    r = ChatRenderer(rid, created, await served_model(backend, body.model), body.n, top, names)
    return await respond(request, streams, r, metrics, stream=body.stream, include_usage=body.include_usage(),
                         n=body.n)
