"""The shared stream helper of the OpenAI layer over a scripted backend (no model): streamed and collected
responses agree, echo and usage are counted once, and an error event ends either way cleanly."""

from __future__ import annotations

import json

from starlette.testclient import TestClient

from quantchat.serving.openai.app import create_app
from quantchat.serving.protocol import GenerateRequest


def event(text: str, finish: str | None = None, **kw) -> dict:
    entry = {"token": text, "logprob": -1.0, "top": [(text, -1.0), ("z", -2.0)]}
    return {"text": text, "token_ids": [1] if text else [], "logprobs": [entry] if text else [],
            "finish_reason": finish, "prompt_tokens": 3, "completion_tokens": 2, **kw}


class ScriptedBackend:
    """Every sequence answers "ab" (or an error after "a" when ``fail``); the prompt echoes as "P"."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def ready(self) -> bool:
        return True

    async def models(self):
        return [{"id": "m", "created": 0, "max_model_len": 8}]

    async def generate(self, model, req: GenerateRequest):
        async def events():
            prompt = {"prompt_text": "P", "prompt_logprobs": [{"token": "P", "logprob": None, "top": []}]}
            yield event("a", **(prompt if req.echo else {}))
            if self.fail:
                yield {"error": "worker lost"}
            yield event("b", "length")
        return events()

    async def stats(self):
        return {}


def sse_events(body: str) -> list:
    events = [e for e in body.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def streamed(client: TestClient, path: str, body: dict) -> tuple[dict[int, str], dict[int, str], dict]:
    r = client.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = sse_events(r.text)
    for c in chunks[:-1]:
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + (ch["delta"].get("content", "") if "delta" in ch
                                                                else ch["text"])
            if ch["finish_reason"]:
                finish[ch["index"]] = ch["finish_reason"]
    return texts, finish, chunks[-1]["usage"]


def test_streamed_and_collected_agree_for_chat_and_completions():
    client = TestClient(create_app(ScriptedBackend()))
    for path, body, key in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "message"),
        ("/v1/completions", {"prompt": ["x", "y"], "n": 2, "echo": True}, "text"),
    ):
        texts, finish, usage = streamed(client, path, body)
        full = client.post(path, json=body).json()
        got = {c["index"]: c["message"]["content"] if key == "message" else c["text"] for c in full["choices"]}
        assert texts == got and finish == {c["index"]: c["finish_reason"] for c in full["choices"]}
        assert usage == full["usage"]
    assert got == {i: "Pab" for i in range(4)}  # echo: the prompt once, at the start of each choice
    assert full["usage"] == {"prompt_tokens": 6, "completion_tokens": 8, "total_tokens": 14}  # each prompt once


def test_streamed_completion_logprobs_join_to_the_collected_ones():
    client = TestClient(create_app(ScriptedBackend()))
    body = {"prompt": "x", "echo": True, "logprobs": 1}
    chunks = sse_events(client.post("/v1/completions", json={**body, "stream": True}).text)
    joined: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for k in joined:
            joined[k] += c["choices"][0]["logprobs"][k]
    full = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert joined == full and full["text_offset"] == [0, 1, 2]


def test_error_event_ends_the_stream_and_fails_the_collected_response():
    client = TestClient(create_app(ScriptedBackend(fail=True)))
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/completions", {"prompt": "x"})):
        chunks = sse_events(client.post(path, json={**body, "stream": True}).text)
        assert chunks[-1] == {"error": {"message": "worker lost", "type": "server_error", "param": None, "code": 500}}
        r = client.post(path, json=body)
        assert r.status_code == 503 and r.json()["error"]["message"] == "worker lost"
