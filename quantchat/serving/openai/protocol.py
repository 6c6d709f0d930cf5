"""OpenAI's wire formats: every request and response model of the API.

Requests ignore unknown fields, except OpenAI's own that quantchat cannot honour (``UNSUPPORTED``): those
are a 400 naming the field, never silently dropped. The fields we read are validated here, with limits, so
bad input is a 400 before it reaches a worker. Responses are dumped in field order (``model_dump``), as the wire has them.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from quantchat.errors import BadRequestError
from quantchat.serving.protocol import GenerateRequest, Limited

MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 512
MAX_PROMPTS = 64


# -- requests -----------------------------------------------------------------------------------
def _stop_list(v: Any) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, (str, list, tuple)):  # a number, an object: not a list of stop strings (no 500)
        raise ValueError("stop must be a string or a list of strings")
    stops = [v] if isinstance(v, str) else list(v)
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings")
    for s in stops:
        if not isinstance(s, str):
            raise ValueError("stop must be a string or a list of strings")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"a stop string is limited to {MAX_STOP_CHARS} characters")
    return [s for s in stops if s]


class StreamOptions(Limited):
    include_usage: bool = False


# OpenAI request fields quantchat cannot honour, each with the values that mean "not used" (accepted)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "store": (None, False),
    "best_of": (None, 1),
    "service_tier": (None, "auto", "default"),
    "functions": (None, []),  # the legacy form of tools
    "function_call": (None, "none", "auto"),
}
# read and harmless: OpenAI's bookkeeping fields (quantchat stores nothing, caches prefixes by itself)
IGNORED = ("metadata", "prompt_cache_key", "safety_identifier", "user")

SCHEMA_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class JsonSchemaFormat(Limited):
    name: str = Field("response", pattern=SCHEMA_NAME)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Limited):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(Limited):
    name: str = Field(pattern=SCHEMA_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Limited):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Limited):
    name: str


class NamedToolChoice(Limited):
    type: Literal["function"]
    function: NamedFunction


def strict_schema(schema: Any) -> Any:
    """OpenAI's strict mode on a schema: objects admit no property but theirs unless they say otherwise
    (the other strict rules, every property required, only restrict what a client may send)."""
    if isinstance(schema, dict):
        out = {k: strict_schema(v) for k, v in schema.items()}
        if out.get("type") == "object" or "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


class SamplingFields(Limited):
    """Fields shared by chat and completions requests."""

    model_config = ConfigDict(extra="allow")  # kept, so ``check_supported`` sees OpenAI's other fields

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension (vLLM, llama.cpp): 0 = off
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)  # extension (near 0: logits overflow)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False  # extension (benchmarks)
    user: str | None = None
    response_format: ResponseFormat | None = None
    regex: str | None = Field(None, max_length=64 * 1024)  # extension: the output matches this pattern
    grammar: str | None = Field(None, max_length=256 * 1024)  # extension: a Lark or GBNF grammar

    _norm_stop = field_validator("stop", mode="before")(_stop_list)

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v < 2**63:
            raise ValueError("seed must be in [0, 2^63)")
        return v

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """A 400 naming the first OpenAI field set to something quantchat cannot honour."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise BadRequestError(f"{name} is not supported by quantchat", name)

    def constraint(self) -> dict[str, str] | None:
        """The structured-output constraint asked for (response_format, regex or grammar), as the worker
        protocol carries it; at most one of them."""
        asked = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(("response_format", {"kind": "json_object", "spec": ""}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise BadRequestError("response_format json_schema needs json_schema.schema", "response_format")
            schema = rf.json_schema.schema_
            if rf.json_schema.strict:
                schema = strict_schema(schema)
            asked.append(("response_format", {"kind": "json_schema", "spec": json.dumps(schema)}))
        if self.regex is not None:
            asked.append(("regex", {"kind": "regex", "spec": self.regex}))
        if self.grammar is not None:
            asked.append(("grammar", {"kind": "grammar", "spec": self.grammar}))
        if len(asked) > 1:
            raise BadRequestError(f"give at most one of {', '.join(a for a, _ in asked)}", asked[1][0])
        return asked[0][1] if asked else None

    def generate_request(self, seed_offset: int, **kw: Any) -> GenerateRequest:
        """The worker request for one sequence (its seed is ``seed + seed_offset``)."""
        return GenerateRequest(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else self.seed + seed_offset, stop=self.stop, ignore_eos=self.ignore_eos,
            **{"constraint": self.constraint(), **kw},
        )


class FunctionCall(Limited):
    name: str
    arguments: str = "{}"


class ToolCallIn(Limited):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Limited):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result answers this call

    def text(self) -> str:
        """The message's text; content parts of type text are joined (images are not supported)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):  # a 400 on every route
                raise BadRequestError(f"unsupported content part type {part.get('type')!r} (only text)", "messages")
            out.append(part["text"])
        return "".join(out)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list of strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            out: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [list(p)]  # type: ignore[arg-type]
        else:
            out = list(p)  # type: ignore[arg-type]
        if not out:
            raise ValueError("prompt must not be empty")
        if len(out) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return out


class TokenizeRequest(Limited):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(Limited):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


# -- responses ----------------------------------------------------------------------------------
class OmitNone(BaseModel):
    """Leaves the fields named in ``omit_none`` out of the dump when they are None."""

    omit_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler) -> dict[str, Any]:
        out = handler(self)
        for k in self.omit_none:
            if out.get(k, 0) is None:
                del out[k]
        return out


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "quantchat"


class ListedModel(ModelCard):
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ListedModel]


class DetokenizeResponse(BaseModel):
    prompt: str


class ResponseHead(BaseModel):
    """The fields every completion response and chunk starts with."""

    id: str
    object: str
    created: int
    model: str


class TopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(OmitNone):
    omit_none = ("tool_calls",)
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(ResponseHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(OmitNone):
    omit_none = ("name", "arguments")
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(OmitNone):
    omit_none = ("id", "type")
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class DeltaMessage(OmitNone):
    omit_none = ("role", "content", "tool_calls")
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(ResponseHead, OmitNone):
    omit_none = ("usage",)
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(ResponseHead):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(ResponseHead, OmitNone):
    omit_none = ("usage",)
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
