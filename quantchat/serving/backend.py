"""Where sequences run: the ``Backend`` protocol and ``LocalBackend`` (one in-process worker).

The controller's backend (``quantchat.serving.controller.ControllerBackend``) dispatches to remote workers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from quantchat.errors import UnavailableError, UnknownModelError
from quantchat.serving.openai.protocol import TokenizeRequest
from quantchat.serving.protocol import GenerateRequest


class Backend(Protocol):
    def ready(self) -> bool: ...
    async def models(self) -> list[dict[str, Any]]: ...
    async def generate(self, model: str | None, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]: ...
    async def tokenize(self, model: str | None, req: TokenizeRequest) -> dict[str, Any]: ...
    async def detokenize(self, model: str | None, tokens: list[int]) -> str: ...
    async def stats(self) -> dict[str, Any]: ...


class LocalBackend:
    """One in-process worker (set once loaded; until then requests get 503)."""

    def __init__(self, worker=None) -> None:
        self.worker = worker
        self.load_error: str | None = None

    def ready(self) -> bool:
        return self.worker is not None

    def _worker(self, model: str | None):
        if self.worker is None:
            raise UnavailableError(self.load_error or "the model is still loading")
        if model not in (None, "", self.worker.model_name):
            raise UnknownModelError(f"The model '{model}' does not exist (served: {self.worker.model_name})")
        return self.worker

    async def models(self) -> list[dict[str, Any]]:
        if self.worker is None:
            return []
        w = self.worker
        return [{"id": w.model_name, "created": w.created, "max_model_len": w.max_seq_len}]

    async def generate(self, model: str | None, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        return await self._worker(model).generate(req)

    async def tokenize(self, model: str | None, req: TokenizeRequest) -> dict[str, Any]:
        w = self._worker(model)
        msgs = None if req.messages is None else [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = w.tokenize(req.prompt, msgs, req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": w.max_seq_len}

    async def detokenize(self, model: str | None, tokens: list[int]) -> str:
        return self._worker(model).detokenize(tokens)

    async def stats(self) -> dict[str, Any]:
        return {} if self.worker is None else self.worker.status()


async def served_model(backend: Backend, requested: str | None) -> str:
    """The model a response names: the one asked for, else the first served."""
    return requested or (await backend.models() or [{"id": "unknown"}])[0]["id"]
