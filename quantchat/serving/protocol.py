"""Wire formats: OpenAI's request models (what clients send) and the internal worker request.

Unknown fields are ignored (clients send many optional ones); the fields we do read are validated
here, with limits, so bad input is a 400 before it reaches a worker.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 512
MAX_PROMPTS = 64


class Limited(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _stop_list(v: Any) -> list[str]:
    if v is None:
        return []
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


class SamplingFields(Limited):
    """Fields shared by chat and completions requests."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension (vLLM, llama.cpp): 0 = off
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # extension
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False  # extension (benchmarks)
    user: str | None = None

    _norm_stop = field_validator("stop", mode="before")(_stop_list)

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v < 2**63:
            raise ValueError("seed must be in [0, 2^63)")
        return v


class ChatMessage(Limited):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; content parts of type text are joined (images are not supported)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"unsupported content part type {part.get('type')!r} (only text)")
            out.append(part["text"])
        return "".join(out)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True

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


class GenerateRequest(Limited):
    """What the API asks of a worker: one sequence (the API fans out n and prompt lists)."""

    prompt_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    add_generation_prompt: bool = True
    max_tokens: int | None = None  # None: up to the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's and the k best
    echo: bool = False  # return the prompt's text (and its logprobs when logprobs is set)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
