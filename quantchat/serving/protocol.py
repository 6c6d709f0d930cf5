"""The worker protocol: what the OpenAI layer asks of a worker (one sequence per request).

The OpenAI request and response models are in ``quantchat.serving.openai.protocol``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Limited(BaseModel):
    """Unknown fields are ignored (clients send many optional ones)."""

    model_config = ConfigDict(extra="ignore")


class GenerateRequest(Limited):
    """What the API asks of a worker: one sequence (the API fans out n and prompt lists)."""

    prompt_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None  # role, content; tool_calls, tool_call_id
    tools: list[dict[str, Any]] | None = None  # OpenAI's tool definitions, rendered into the chat prompt
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
    constraint: dict[str, str] | None = None  # structured output: {kind, spec} (quantchat/sampling/constraints.py)
