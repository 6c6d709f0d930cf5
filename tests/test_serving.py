"""The OpenAI-compatible server on loopback, driven by the official ``openai`` client and raw HTTP.

A real uvicorn server runs in a background thread of the test process (one per module) over a tiny
random chat model; one test also starts ``quantchat serve`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from quantchat.engine.build import load_engine
from quantchat.sampling.sampling import SamplingParams
from quantchat.serving.backend import LocalBackend
from quantchat.serving.openai.app import create_app
from quantchat.serving.worker import Worker
from tiny_models import PRINTABLE, make_tiny_chat_model

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on a free loopback port, in a daemon thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_serve")
    make_tiny_chat_model(d)
    return d


@pytest.fixture(scope="module")
def worker(tiny_dir):
    loaded = load_engine(str(tiny_dir), device="cpu", dtype="float32", max_seq_len=256, max_batch=8)
    w = Worker(loaded.engine, "tiny", max_queue=64)
    yield w
    w.close()


@pytest.fixture(scope="module")
def server(worker):
    s = ServerThread(create_app(LocalBackend(worker), api_keys={KEY}, max_body_bytes=64 * 1024))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers={**headers, "content-type": "application/json"},
                          timeout=60, **kw)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def wait_idle(worker: Worker, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while worker.scheduler.running_batch or worker.scheduler.queue_length:
        assert time.time() < deadline, worker.scheduler.stats()
        time.sleep(0.02)


# -- OpenAI semantics ---------------------------------------------------------------------------
def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_non_streaming(client, worker):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert len(text) == 12 and set(text.encode()) <= set(PRINTABLE)
    ids = worker.render_chat([{"role": "user", "content": "hello"}])
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(ids) + 12
    # the same answer as the engine run directly (greedy)
    from quantchat.sampling.sampling import SamplingParams

    direct, _ = worker.engine.generate_text(ids, SamplingParams(temperature=0, max_new_tokens=12))
    assert text == direct


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] and len(text) == 12
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    full = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=12, temperature=0)
    assert full.choices[0].message.content == text


def test_sse_wire_format(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    json.loads(events[0][6:])


def test_streamed_and_collected_responses_agree(server):
    """The shared stream helper: the same choices, text, finish reasons and usage either way (seeded n=2)."""
    def texts_of(path: str, body: dict) -> tuple[dict, dict]:
        full = post(server, path, body).json()
        with httpx.stream("POST", server.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            events = [json.loads(e[6:]) for e in r.read().decode().split("\n\n") if e and e != "data: [DONE]"]
        got: dict[int, list] = {}
        for ev in events[:-1]:
            for c in ev["choices"]:
                part = c["delta"].get("content", "") if "delta" in c else c["text"]
                got.setdefault(c["index"], ["", None])[0] += part
                got[c["index"]][1] = c["finish_reason"] or got[c["index"]][1]
        want = {c["index"]: [c["message"]["content"] if "message" in c else c["text"], c["finish_reason"]]
                for c in full["choices"]}
        assert events[-1]["usage"] == full["usage"]
        return got, want

    sampling = {"max_tokens": 6, "n": 2, "seed": 11, "temperature": 0.8}
    got, want = texts_of("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **sampling})
    assert got == want and len(want) == 2
    got, want = texts_of("/v1/completions", {"prompt": ["ab", "cd"], "echo": True, **sampling})
    assert got == want and len(want) == 4 and want[2][0].startswith("cd")


def test_completion_echo_logprobs_token_ids(client, worker):
    """lm-eval's local-completions shape: token-id prompt, echo, logprobs, max_tokens 0/1."""
    prompt = list(b"the cat sat")
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=3)
    ch = r.choices[0]
    lp = ch.logprobs
    assert ch.text.startswith("the cat sat") and len(ch.text) == len(prompt) + 1
    assert lp.tokens[: len(prompt)] == [chr(b) for b in prompt]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(prompt) + 1 and lp.text_offset == list(range(len(prompt) + 1))
    # reference: log-softmax of the model's own logits, its keys and values rounded as the worker's cache
    # stores them (a private copy of the model with a cache of that dtype)
    full = prompt + [ord(ch.text[-1])]
    ref_model = copy.deepcopy(worker.engine.model)
    ref_model.setup_caches(1, len(full), worker.engine.model.layers[0].attention.kv_cache.k_cache.dtype)
    with torch.no_grad():
        logits = ref_model(torch.tensor([full]), torch.arange(len(full))[None], kv_len=len(full))[0]
    ref = torch.log_softmax(logits.double(), -1)
    for i in range(1, len(full)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, full[i]]), abs=1e-4)
        top = lp.top_logprobs[i]
        assert len(top) >= 3
        best = max(top, key=top.get)
        assert ord(best) == int(ref[i - 1].argmax())
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 1
    r0 = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert r0.choices[0].text == "the cat sat" and len(r0.choices[0].logprobs.tokens) == len(prompt)
    assert r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(prompt)], abs=1e-5)


def test_completion_prompt_list_and_default_max_tokens(client):
    r = client.completions.create(model="tiny", prompt=["abc", "hello there"], temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(len(c.text) == 16 for c in r.choices)  # OpenAI's default max_tokens is 16
    assert r.usage.completion_tokens == 32


def test_stop_string(client):
    base = client.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=0).choices[0].text
    stop = base[5:7]
    cut = base.index(stop)
    for stream in (False, True):
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(
                model="tiny", prompt="hello", max_tokens=20, temperature=0, stop=[stop, "zzzz"], stream=True))
        else:
            r = client.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=0, stop=stop)
            assert r.choices[0].finish_reason == "stop"
            text = r.choices[0].text
        assert text == base[:cut]


def test_n_and_seed(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3,
                                       max_tokens=8, temperature=0)
    assert len(r.choices) == 3 and len({c.message.content for c in r.choices}) == 1
    assert r.usage.completion_tokens == 24
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=16, temperature=1.0,
              seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # seed + index per choice


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token  # greedy = best
        assert c.logprob <= 0 and c.bytes == list(c.token.encode())


def test_tokenize_detokenize(server):
    r = post(server, "/tokenize", {"prompt": "abc"}).json()
    assert r["tokens"][-3:] == [97, 98, 99] and r["max_model_len"] == 256
    assert post(server, "/detokenize", {"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert post(server, "/detokenize", {"tokens": [99999]}).status_code == 400


# -- errors -------------------------------------------------------------------------------------
def assert_error(r: httpx.Response, status: int, text: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert text.lower() in err["message"].lower(), err
    return err


def test_auth(server, client):
    assert_error(post(server, "/v1/completions", {"prompt": "a"}, key=None), 401, "api key")
    assert_error(post(server, "/v1/completions", {"prompt": "a"}, key="wrong"), 401)
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    odd = httpx.get(server.url + "/v1/models", headers={"Authorization": b"Bearer \xe9\xff"}, timeout=10)
    assert odd.status_code == 401 and odd.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_bad_requests(server, client):
    assert_error(post(server, "/v1/chat/completions", b"{not json"), 400, "json")
    assert_error(post(server, "/v1/chat/completions", {"messages": []}), 400, "messages")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                       "temperature": 5}), 400, "temperature")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(post(server, "/v1/completions", {"prompt": "x", "max_tokens": -1}), 400, "max_tokens")
    assert_error(post(server, "/v1/completions", {"prompt": [1, 2, 100000]}), 400, "vocabulary")
    assert_error(post(server, "/v1/completions", {"prompt": "x", "stop": ["a"] * 40}), 400, "stop")
    err = assert_error(post(server, "/v1/completions", {"prompt": "x" * 300, "max_tokens": 4}), 400,
                       "maximum context length is 256")
    assert err["type"] == "invalid_request_error"
    assert_error(post(server, "/v1/completions", {"prompt": "x" * 200, "max_tokens": 100}), 400, "context length")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "y" * 400}])
    assert_error(post(server, "/v1/chat/completions", {"model": "gpt-9", "messages": [
        {"role": "user", "content": "x"}]}), 404, "gpt-9")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    assert_error(post(server, "/v1/completions", {"prompt": "x" * 100_000}), 413)
    assert post(server, "/v1/nothing-here", {}).status_code == 404


def test_bad_input_is_a_clear_4xx(server, worker):
    """Malformed, mistyped, oversized or hostile requests: each a 4xx in the OpenAI error shape, never a 500,
    and the server keeps answering."""
    chat = [{"role": "user", "content": "x"}]
    cases = [  # (path, body, status, words in the message)
        ("/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 2}', 400, "not valid json"),  # invalid UTF-8
        ("/v1/completions", b'{"pr\xc3ompt": "x"}', 400, "not valid json"),
        ("/v1/completions", b"[" * 20000 + b"]" * 20000, 400, ""),  # nesting deeper than a parser's stack
        ("/v1/completions", b"null", 400, ""),
        ("/v1/completions", b'"a string"', 400, ""),
        ("/v1/completions", b"", 400, ""),
        ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400, "context length"),  # huge max_tokens
        ("/v1/completions", {"prompt": "x", "max_tokens": 2**80}, 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 1e400}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
        ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
        ("/v1/completions", {"prompt": "x", "stop": {"a": 1}}, 400, "stop"),
        ("/v1/completions", {"prompt": "x", "n": 10**6}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "logprobs": "all"}, 400, "logprobs"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
        ("/v1/chat/completions", {"messages": chat, "stream": "maybe"}, 400, "stream"),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": [1]}, 400, "max_tokens"),
        # found by schemathesis: logits divided into inf killed the scheduler (every later request a 503)
        ("/v1/chat/completions", {"messages": chat, "repetition_penalty": 1e-308}, 400, "repetition_penalty"),
        ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400, "content part"),
        ("/tokenize", {"prompt": 5}, 400, ""),
        ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
        ("/detokenize", {"tokens": [10**30]}, 400, ""),
    ]
    for path, body, status, words in cases:
        r = post(server, path, body)
        assert r.status_code == status, (path, body if len(str(body)) < 200 else "(long)", r.text)
        assert_error(r, status, words)
    # an oversized body without a Content-Length (chunked): 413 all the same
    r = httpx.post(server.url + "/v1/completions", content=(b'{"prompt": "' + b"x" * 1024 for _ in range(100)),
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"}, timeout=30)
    assert_error(r, 413, "larger than")
    # path traversal in model names: an unknown model (404), never a file read
    for name in ("../../../../etc/passwd", "/etc/passwd", "tiny/../../pyproject.toml", "..\\..\\x", "\x00"):
        r = post(server, "/v1/chat/completions", {"model": name, "messages": chat, "max_tokens": 1})
        assert_error(r, 404, "does not exist")
        assert "root:" not in r.text
    for path in ("/v1/models/..%2F..%2F..%2Fetc%2Fpasswd", "/v1/models/../../etc/passwd",
                 "/static/..%2F..%2F..%2Fpyproject.toml", "/static/%2e%2e%2fapp.py", "/static/.hidden"):
        r = httpx.get(server.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.status_code == 404 and "error" in r.json(), (path, r.text)
    assert post(server, "/v1/completions", {"prompt": "still fine", "max_tokens": 2}).status_code == 200


def test_slow_clients_are_closed(worker):
    """Slowloris: a connection that dribbles its request header is closed after the header timeout; a body
    that stalls gets 408; a client that keeps sending in time is served."""
    from quantchat.serving.slow_clients import with_header_timeout

    app = create_app(LocalBackend(worker), body_timeout_s=0.6)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           http=with_header_timeout(0.8)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline
            time.sleep(0.02)

        def closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
            t0 = time.monotonic()
            sock.settimeout(limit)
            got = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    return time.monotonic() - t0, got
                got += chunk

        with socket.create_connection(("127.0.0.1", port)) as s:  # connects, sends nothing
            dt, got = closed_after(s, 5)
            assert got == b"" and 0.5 < dt < 3
        with socket.create_connection(("127.0.0.1", port)) as s:  # a header a byte at a time
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            t0 = time.monotonic()
            for c in b"X-Slow: " + b"a" * 40:
                try:
                    s.sendall(bytes([c]))
                except OSError:  # closed by the server: what the test wants
                    break
                time.sleep(0.1)
            dt, got = closed_after(s, 5)
            assert got == b"" and time.monotonic() - t0 < 4
        with socket.create_connection(("127.0.0.1", port)) as s:  # a body that stops half way
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            dt, got = closed_after(s, 5)
            assert got.startswith(b"HTTP/1.1 408"), got[:200]
            assert b"stalled" in got
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)  # and the server still answers
        assert r.status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_queue_full_and_loading(worker):
    full = Worker(worker.engine, "tiny", max_queue=0)  # a second scheduler on the same engine, never used
    try:
        s = ServerThread(create_app(LocalBackend(full)))
        try:
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
            assert_error(r, 429, "queue")
            assert r.headers["retry-after"] == "1"
        finally:
            s.stop()
    finally:
        full.close()
    backend = LocalBackend()
    s = ServerThread(create_app(backend))
    try:
        assert httpx.get(s.url + "/health", timeout=10).status_code == 503
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
        assert_error(r, 503, "loading")
        assert "retry-after" in r.headers
    finally:
        s.stop()


# -- continuous batching ------------------------------------------------------------------------
def test_concurrent_streams_equal_solo_runs(client, worker):
    """8 concurrent greedy streams of different lengths all finish and equal the same request run alone."""
    prompts = [f"prompt number {i} " + "ab" * i for i in range(8)]
    lengths = [5 + 3 * i for i in range(8)]

    def run(i: int, stream: bool) -> str:
        kw = dict(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        return client.completions.create(**kw).choices[0].text

    solo = [run(i, False) for i in range(8)]
    wait_idle(worker)
    steps0 = worker.scheduler.decode_steps
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: run(i, True), range(8)))
    assert together == solo
    assert [len(t) for t in together] == lengths
    # batching, not queueing: far fewer decode steps than the sum of the tokens
    assert worker.scheduler.decode_steps - steps0 < sum(lengths) * 0.7


def test_disconnect_frees_slot(server, worker, monkeypatch):
    """A client that goes away mid-stream frees its slot: decode steps are slowed to 20 ms here, so the
    240 tokens asked for would take 4.8 s; the sequence must end long before, with fewer tokens."""
    sch = worker.scheduler
    wait_idle(worker)
    real_step = sch._decode_step

    def slow_step():
        time.sleep(0.02)
        real_step()

    monkeypatch.setattr(sch, "_decode_step", slow_step)
    before = sch.generation_tokens_total
    t0 = time.time()
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "go", "max_tokens": 240, "stream": True, "ignore_eos": True},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
        assert sch.running_batch == 1
    wait_idle(worker, timeout=30)
    assert sch.running_batch == 0
    assert sch.generation_tokens_total - before < 240 and time.time() - t0 < 4.8


def test_scheduler_kv_compaction_mixed_lengths(worker):
    """Sequences join and leave at different steps; each still equals its solo greedy run."""
    from quantchat.engine.scheduler import Sequence
    from quantchat.sampling.sampling import SamplingParams

    eng = worker.engine
    wait_idle(worker)
    prompts = [list(b"xy" * (i + 1)) for i in range(6)]
    lims = [3, 17, 6, 25, 1, 9]
    solo = []
    for p, n in zip(prompts, lims):
        out = eng.generate_batch([p], SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))[0]
        solo.append(out)
    results: dict[int, list[int]] = {i: [] for i in range(6)}
    done = threading.Event()
    finished: list[int] = []

    def sink_for(i):
        def sink(ev):
            results[i] += ev.token_ids
            if ev.finish_reason:
                finished.append(i)
                if len(finished) == 6:
                    done.set()
        return sink

    for i, (p, n) in enumerate(zip(prompts, lims)):
        worker.scheduler.submit(Sequence(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True),
                                         sink_for(i)))
        time.sleep(0.01 * i)  # staggered arrivals
    assert done.wait(30)
    assert [results[i] for i in range(6)] == solo


def test_grouped_prefill_of_waiting_prompts(tiny_dir, monkeypatch):
    """Prompts waiting together are prefilled in one padded forward (short ones), long or logprob prompts
    on their own; every answer equals its solo run, token limits 0 and 1 included."""
    from quantchat.engine import batching as sched_mod
    from quantchat.engine.scheduler import Scheduler, Sequence
    from quantchat.sampling.sampling import SamplingParams

    monkeypatch.setattr(sched_mod, "PREFILL_STEP", 16)  # prompts over 16 tokens take the chunked path
    eng = load_engine(str(tiny_dir), device="cpu", dtype="float32", max_seq_len=128, max_batch=4).engine
    prompts = [list(b"ab" * (i + 1)) for i in range(7)] + [list(b"long prompt " * 3), list(b"lp")]
    lims = [4, 0, 9, 1, 6, 12, 3, 7, 5]
    solo = [eng.generate_batch([p], SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))[0]
            for p, n in zip(prompts, lims)]
    sch = Scheduler(eng)
    groups: list[int] = []
    real = sch._prefill_group
    monkeypatch.setattr(sch, "_prefill_group", lambda g: groups.append(len(g)) or real(g))
    results: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    reasons: dict[int, str] = {}
    done = threading.Event()

    def sink_for(i):
        def sink(ev):
            results[i] += ev.token_ids
            if ev.finish_reason:
                reasons[i] = ev.finish_reason
                if len(reasons) == len(prompts):
                    done.set()
        return sink

    for i, (p, n) in enumerate(zip(prompts, lims)):  # all waiting before the loop starts
        sch.submit(Sequence(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True), sink_for(i),
                            prompt_logprobs=i == 8, logprobs=0 if i == 8 else None))
    sch.start()
    try:
        assert done.wait(60)
    finally:
        sch.stop()
    assert [results[i] for i in range(len(prompts))] == solo
    assert all(reasons[i] == "length" for i in range(len(prompts)))
    assert groups and groups[0] == 4 and max(groups) <= 4  # the first four short prompts in one forward
    assert sum(groups) == 7  # every short prompt went through a group; the long and the logprob one did not


def test_split_padded_prefill_runs():
    from quantchat.engine.scheduler import split_padded

    assert split_padded([]) == []
    assert split_padded([5]) == [(0, 1)]
    assert split_padded([30, 32, 35, 40]) == [(0, 4)]  # padding a little beats another forward
    assert split_padded([1, 1, 1, 1, 1, 40]) == [(0, 5), (5, 6)]  # not 6 x 40 rows for one long prompt
    assert split_padded([1, 2, 40, 41, 90], forward_rows=16) == [(0, 2), (2, 4), (4, 5)]
    assert split_padded([1, 90], forward_rows=1000) == [(0, 2)]


def test_cached_and_new_prompts_prefill_in_separate_forwards(tiny_dir, monkeypatch):
    """Waiting prompts whose KV is mostly cached are not padded up to a new long one: the group is split
    (two forwards), and every answer still equals its solo run."""
    from quantchat.engine.scheduler import Scheduler

    eng = load_engine(str(tiny_dir), device="cpu", dtype="float32", max_seq_len=128, max_batch=4).engine
    sch = Scheduler(eng)
    cached = [list(b"the same old prompt " * 2 + bytes([65 + i])) for i in range(3)]
    fresh = list(b"an entirely new and rather long prompt here")
    follow = [p + list(b"??") for p in cached]  # the cached prompts plus two new tokens
    lims = [5, 6, 7, 8]
    greedy = lambda p, n: eng.generate_batch([p], SamplingParams(temperature=0, max_new_tokens=n,  # noqa: E731
                                                                 ignore_eos=True))[0]
    solo = [greedy(p, n) for p, n in zip(cached + [fresh], lims)]
    solo_follow = [greedy(p, n) for p, n in zip(follow, lims)]
    first = run_scheduled_inline(sch, cached, lims[:3])  # now their KV sits in the slots
    assert first == solo[:3]
    forwards: list[int] = []
    real = sch._prefill_rows
    monkeypatch.setattr(sch, "_prefill_rows", lambda g: forwards.append(len(g)) or real(g))
    assert run_scheduled_inline(sch, [fresh] + follow, [lims[3]] + lims[:3]) == [solo[3]] + solo_follow
    assert sorted(forwards) == [1, 3]


def test_repeated_prompt_starts_without_a_forward(tiny_dir, monkeypatch):
    """A prompt seen before whose whole KV a slot still holds (a regenerated answer, the n choices of a
    request) starts from the kept first-token logits: no prefill forward, the same answers."""
    from quantchat.engine.scheduler import PROMPT_LOGITS_KEPT, Scheduler, Sequence

    eng = load_engine(str(tiny_dir), device="cpu", dtype="float32", max_seq_len=128, max_batch=4).engine
    sch = Scheduler(eng)
    prompts = [list(b"tell me a story about " + w) for w in (b"cats", b"dogs")]
    solo = [eng.generate_batch([p], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))[0]
            for p in prompts]
    assert run_scheduled_inline(sch, prompts, [6, 6]) == solo
    forwards: list[int] = []
    real = sch._prefill_rows
    monkeypatch.setattr(sch, "_prefill_rows", lambda g: forwards.append(len(g)) or real(g))
    cached0 = sch.prompt_tokens_cached_total
    assert run_scheduled_inline(sch, prompts + prompts[:1], [6, 6, 6]) == solo + solo[:1]
    assert forwards == [] and sch.prompt_tokens_cached_total - cached0 == 2 * len(prompts[0]) + len(prompts[1])

    def sampled(seed: int) -> list[int]:  # a seeded sampled answer: the same draws from the kept logits
        out: list[int] = []
        sch.submit(Sequence(prompts[1], SamplingParams(temperature=0.9, max_new_tokens=8, ignore_eos=True, seed=seed),
                            lambda ev: out.extend(ev.token_ids)))
        while sch.waiting or sch.decoding or sch.prefilling:
            sch.step()
        return out

    assert sampled(3) == sampled(3) != sampled(4)
    assert forwards == [] and len(sch.prompt_logits) <= PROMPT_LOGITS_KEPT
    # its KV gone from every slot: computed again, once for two copies arriving together
    eng.slot_tokens = [[] for _ in eng.slot_tokens]
    assert run_scheduled_inline(sch, prompts[:1] * 2, [6, 4]) == [solo[0], solo[0][:4]] and forwards == [1]


def test_prompts_sharing_only_a_system_prompt_do_not_evict_each_other(tiny_dir, monkeypatch):
    """One client, prompts one after another that share only their first tokens (a system prompt): each
    new one used to overwrite the last conversation past the shared part in its slot. The last one is
    parked first, so asking it again later starts with no forward at all."""
    from quantchat.engine.scheduler import Scheduler

    eng = load_engine(str(tiny_dir), device="cpu", dtype="float32", max_seq_len=128, max_batch=4).engine
    sch = Scheduler(eng, max_batch=2)
    eng.slot_tokens = [[] for _ in eng.slot_tokens]
    system = list(b"<s>system: be brief</s><s>user: ")
    prompts = [system + list(w) for w in (b"cats?</s>", b"dogs?</s>", b"owls?</s>")]
    first = [run_scheduled_inline(sch, [p], [5])[0] for p in prompts]  # one at a time, as one client sends
    forwards: list[int] = []
    real = sch._prefill_rows
    monkeypatch.setattr(sch, "_prefill_rows", lambda g: forwards.append(len(g)) or real(g))
    cached0 = sch.prompt_tokens_cached_total
    again = [run_scheduled_inline(sch, [p], [5])[0] for p in prompts[:2]]  # 2 parking slots: the last two
    reused = sch.prompt_tokens_cached_total - cached0
    assert forwards == [] and reused == len(prompts[0]) + len(prompts[1])
    assert again == first[:2] == [eng.generate_batch([p], SamplingParams(temperature=0, max_new_tokens=5,
                                                                          ignore_eos=True))[0] for p in prompts[:2]]


@pytest.mark.parametrize("parking", [1, 0])
def test_parking_slots_keep_finished_conversations_at_full_load(tiny_dir, parking):
    """With every batch slot taken by new prompts, the conversations that just finished move to the parking
    slots (past the scheduler's max_batch) instead of being overwritten: their next turn reuses them."""
    from quantchat.engine.scheduler import Scheduler

    eng = load_engine(str(tiny_dir), device="cpu", dtype="float32", max_seq_len=128, max_batch=2 + parking).engine
    sch = Scheduler(eng, max_batch=2)
    ref = load_engine(str(tiny_dir), device="cpu", dtype="float32", max_seq_len=128, max_batch=1).engine
    greedy = lambda p, n: ref.generate_batch([p], SamplingParams(temperature=0, max_new_tokens=n,  # noqa: E731
                                                                 ignore_eos=True))[0]
    a, b = list(b"<s>user: first chat</s>"), list(b"<s>user: second one</s>")
    c, d = list(b"[other] what now?"), list(b"[other] and then")
    eng.slot_tokens = [[] for _ in eng.slot_tokens]
    answers = run_scheduled_inline(sch, [a, b], [5, 6])
    assert run_scheduled_inline(sch, [c, d], [4, 4]) == [greedy(c, 4), greedy(d, 4)]  # both batch slots reused
    turn = b + answers[1] + list(b"<s>user: more</s>")
    cached0 = sch.prompt_tokens_cached_total
    assert run_scheduled_inline(sch, [turn], [5]) == [greedy(turn, 5)]
    reused = sch.prompt_tokens_cached_total - cached0
    # one parking slot keeps the more recent of the two finished chats (b's: it finished last)
    assert reused == (len(b) + len(answers[1]) - 1 if parking else 0)
    assert len(sch.decoding) == 0 and sch.max_batch == 2 and eng.max_batch == 2 + parking


def run_scheduled_inline(sch, prompts, lims) -> list[list[int]]:
    """Submit greedy sequences together and run the scheduler's loop body here until all finished."""
    from quantchat.engine.scheduler import Sequence

    results: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    for i, (p, n) in enumerate(zip(prompts, lims)):
        sch.submit(Sequence(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True),
                            lambda ev, i=i: results[i].extend(ev.token_ids)))
    while sch.waiting or sch.decoding or sch.prefilling:
        sch.step()
    return [results[i] for i in range(len(prompts))]


def run_scheduled(sch, prompts, lims) -> list[list[int]]:
    """Submit greedy sequences together and wait for all of them; their token ids."""
    from quantchat.engine.scheduler import Sequence
    from quantchat.sampling.sampling import SamplingParams

    results: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    done, finished = threading.Event(), []

    def sink_for(i):
        def sink(ev):
            results[i] += ev.token_ids
            if ev.finish_reason:
                finished.append(i)
                if len(finished) == len(prompts):
                    done.set()
        return sink

    for i, (p, n) in enumerate(zip(prompts, lims)):
        sch.submit(Sequence(list(p), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True), sink_for(i)))
    assert done.wait(60)
    return [results[i] for i in range(len(prompts))]


def test_prefix_reuse_shared_prompt_and_next_turn(tiny_dir, monkeypatch):
    """A prompt sharing a prefix with a slot's KV (another request's, or a finished answer's) computes only
    the rest, and answers exactly as when computed from scratch."""
    from quantchat.engine.scheduler import Scheduler
    from quantchat.sampling.sampling import SamplingParams

    eng = load_engine(str(tiny_dir), device="cpu", dtype="float32", max_seq_len=128, max_batch=3).engine
    greedy = lambda p, n: eng.generate_batch([p], SamplingParams(temperature=0, max_new_tokens=n,  # noqa: E731
                                                                 ignore_eos=True))[0]
    system = list(b"<s>system: be brief</s>")
    first = system + list(b"<s>user: hi</s>")
    others = [system + list(b"<s>user: what is up</s>"), system + list(b"<s>user: bye</s>")]
    want_first = greedy(first, 6)
    sch = Scheduler(eng).start()
    try:
        eng.slot_tokens = [[] for _ in eng.slot_tokens]  # nothing cached yet
        assert run_scheduled(sch, [first], [6]) == [want_first]
        assert sch.prompt_tokens_cached_total == 0
        # the finished answer stays in its slot: the next turn reuses prompt + answer (all but the newest token)
        turn2 = first + want_first + list(b"<s>user: more</s>")
        cached0 = sch.prompt_tokens_cached_total
        got_turn2 = run_scheduled(sch, [turn2], [5])[0]
        assert sch.prompt_tokens_cached_total - cached0 == len(first) + len(want_first) - 1
        # two new prompts with the shared system prompt, prefilled together, each from the cached prefix
        cached0 = sch.prompt_tokens_cached_total
        got_others = run_scheduled(sch, others, [4, 7])
        assert sch.prompt_tokens_cached_total - cached0 >= 2 * len(system)
    finally:
        sch.stop()
    fresh = load_engine(str(tiny_dir), device="cpu", dtype="float32", max_seq_len=128, max_batch=1).engine
    solo = lambda p, n: fresh.generate_batch([p], SamplingParams(temperature=0, max_new_tokens=n,  # noqa: E731
                                                                 ignore_eos=True))[0]
    assert got_turn2 == solo(turn2, 5)
    assert got_others == [solo(others[0], 4), solo(others[1], 7)]


def test_finished_conversation_stays_cached_when_a_running_one_takes_its_slot(tiny_dir):
    """B finishes while A (after it in the batch) still runs: A moves into B's slot, and B's prompt + answer
    are swapped into A's old slot instead of being overwritten, so B's next turn (and later A's) reuse them
    and answer exactly as when computed from scratch."""
    from quantchat.engine.scheduler import Scheduler, Sequence
    from quantchat.sampling.sampling import SamplingParams

    eng = load_engine(str(tiny_dir), device="cpu", dtype="float32", max_seq_len=128, max_batch=3).engine
    eng.slot_tokens = [[] for _ in eng.slot_tokens]
    pb, pa = list(b"<s>user: short one</s>"), list(b"<s>user: a longer answer please</s>")
    results: dict[str, list[int]] = {"a": [], "b": []}
    done = threading.Event()

    def sink_for(key):
        def sink(ev):
            results[key] += ev.token_ids
            if ev.finish_reason and key == "a":
                done.set()
        return sink

    greedy = lambda n: SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)  # noqa: E731
    sch = Scheduler(eng)  # not started: both wait, then go into slots 0 (B) and 1 (A) together
    sch.submit(Sequence(list(pb), greedy(3), sink_for("b")))
    sch.submit(Sequence(list(pa), greedy(12), sink_for("a")))
    sch.start()
    try:
        assert done.wait(60)
        ans_b, ans_a = results["b"], results["a"]
        assert len(ans_b) == 3 and len(ans_a) == 12
        turn2_b = pb + ans_b + list(b"<s>user: and?</s>")
        cached0 = sch.prompt_tokens_cached_total
        got_b = run_scheduled(sch, [turn2_b], [4])[0]
        assert sch.prompt_tokens_cached_total - cached0 == len(pb) + len(ans_b) - 1
        turn2_a = pa + ans_a + list(b"<s>user: ok</s>")
        cached0 = sch.prompt_tokens_cached_total
        got_a = run_scheduled(sch, [turn2_a], [4])[0]
        assert sch.prompt_tokens_cached_total - cached0 == len(pa) + len(ans_a) - 1
    finally:
        sch.stop()
    fresh = load_engine(str(tiny_dir), device="cpu", dtype="float32", max_seq_len=128, max_batch=1).engine
    solo = lambda p, n: fresh.generate_batch([p], greedy(n))[0]  # noqa: E731
    assert got_b == solo(turn2_b, 4) and got_a == solo(turn2_a, 4)
    assert ans_a == solo(pa, 12) and ans_b == solo(pb, 3)


def _prompt_tokens_total(server) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("quantchat_prompt_tokens_total")))


@pytest.mark.parametrize("stream", [False, True])
def test_metrics_count_each_prompt_once(server, client, stream):
    """n=2 answers to one prompt: /metrics adds the prompt's tokens once, streamed or not (as usage)."""
    before = _prompt_tokens_total(server)
    res = client.completions.create(model="tiny", prompt="abcd", max_tokens=2, n=2, stream=stream,
                                    **({"stream_options": {"include_usage": True}} if stream else {}))
    usage = [c for c in res][-1].usage if stream else res.usage
    assert usage.prompt_tokens > 0
    assert _prompt_tokens_total(server) - before == usage.prompt_tokens


def test_metrics(server, client):
    client.completions.create(model="tiny", prompt="abc", max_tokens=2)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    for name in ("quantchat_requests_total", "quantchat_prompt_tokens_total", "quantchat_generation_tokens_total",
                 "quantchat_generation_tokens_per_second", "quantchat_queue_length", "quantchat_running_batch",
                 "quantchat_kv_cache_usage_ratio", "quantchat_prompt_tokens_cached_total"):
        assert f"\n{name}" in "\n" + text, name
    assert 'route="/v1/completions",status="200"' in text
    # the loop's time: decode steps by batch size (the 1-token answer: one step of 1 sequence at least)
    steps = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
             if line.startswith(("quantchat_decode_steps_total{", "quantchat_decode_seconds_total{"))}
    assert steps['quantchat_decode_steps_total{batch="1"}'] >= 1
    assert 0 < steps['quantchat_decode_seconds_total{batch="1"}'] < 60
    assert float(text.split("\nquantchat_prefill_seconds_total ")[1].split()[0]) > 0


@pytest.mark.parametrize("flags", [["--cache-slots", "-1"], ["--max-batch", "0"], ["--max-queue", "-2"]])
def test_serve_refuses_bad_batching_options_before_starting(flags, capsys):
    from quantchat.cli.main import main

    assert main(["serve", "--port", str(free_port()), *flags]) == 2  # no server started, no model loaded
    assert "--cache-slots >= 0" in capsys.readouterr().err


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 90, **httpx_kw) -> None:
    """Until ``url``/health answers 200 (the process must stay alive; its output is the failure message)."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(url + "/health", timeout=2, **httpx_kw).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline
        time.sleep(0.2)


def terminate_output(proc: subprocess.Popen) -> str:
    """Stop the process (killed after 20 s) and return everything it printed."""
    proc.terminate()
    try:
        return proc.communicate(timeout=20)[0].decode()
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0].decode()


def test_serve_command_subprocess(tiny_dir, tmp_path):
    """`quantchat serve` as a user runs it: prints the URL, /health turns 200, answers with the key."""
    port = free_port()
    keyfile = tmp_path / "keys"
    keyfile.write_text("# keys\nk1\n")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen([sys.executable, "-m", "quantchat", "serve", "--model", str(tiny_dir), "--port",
                             str(port), "--api-key-file", str(keyfile), "--quant", "int8", "--max-seq-len", "128"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
        name = f"{tiny_dir.name}-int8"  # the folder's name plus the load-time quantization
        assert c.models.list().data[0].id == name
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert r.choices[0].finish_reason in ("length", "stop")
    finally:
        out = terminate_output(proc)
    assert f"http://127.0.0.1:{port}/" in out


def test_serve_over_tls(tiny_dir, tmp_path):
    """`quantchat serve --tls-cert/--tls-key`: HTTPS only, a hashed key from the key file, a chat answer."""
    import ssl

    from quantchat.serving.keys import hash_key
    from quantchat.serving.tls import make_certs

    certs = make_certs(tmp_path / "certs", roles=("api",))
    port = free_port()
    keyfile = tmp_path / "keys"
    keyfile.write_text(hash_key("sk-tls-0123456789") + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "quantchat", "serve", "--model", str(tiny_dir), "--port", str(port),
                             "--api-key-file", str(keyfile), "--quant", "none", "--max-seq-len", "128",
                             "--tls-cert", str(certs["api"]), "--tls-key", str(certs["api-key"])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, ca = f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=str(certs["ca"]))
        wait_healthy(proc, url, verify=ca)
        r = httpx.post(url + "/v1/chat/completions", verify=ca, timeout=60,
                       headers={"Authorization": "Bearer sk-tls-0123456789"},
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        with pytest.raises(httpx.HTTPError):  # a client that does not trust the CA
            httpx.get(url + "/health", timeout=5)
    finally:
        out = terminate_output(proc)
    assert f"https://127.0.0.1:{port}/" in out and "plain HTTP" not in out


def test_async_client(server):
    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        rs = await asyncio.gather(*[c.completions.create(model="tiny", prompt="ab", max_tokens=4, temperature=0)
                                    for _ in range(4)])
        return [r.choices[0].text for r in rs]

    texts = asyncio.run(main())
    assert len(set(texts)) == 1 and len(texts[0]) == 4


def test_bench_serve_against_running_server(server, tmp_path, capsys):
    """`quantchat bench serve --url`: runs the client sweep, writes JSON, markdown and the plot."""
    import matplotlib.image

    from quantchat.cli.main import main

    rc = main(["bench", "serve", "--url", server.url, "--api-key", KEY, "--clients", "1,3", "--requests", "1",
               "--max-tokens", "4", "--rounds", "2", "--out", str(tmp_path)])
    assert rc == 0
    assert "3 clients / 1 client total tokens/s" in capsys.readouterr().out
    data = json.loads((tmp_path / "result.json").read_text())
    rows = data["rows"]
    assert [r["clients"] for r in rows] == [1, 3] and all(r["errors"] == 0 for r in rows)
    assert all(len(r["tokens_per_s_rounds"]) == 2 and r["tokens_per_s"] in r["tokens_per_s_rounds"] for r in rows)
    assert [r["requests"] for r in rows] == [1, 3] and rows[1]["generated_tokens"] == 12
    assert rows[1]["tokens_per_s"] > 0 and set(rows[1]["ttft_s"]) >= {"p50", "p90", "p99"}
    # the server's own step timers, from /metrics around each run: one client decodes in steps of 1
    one = rows[0]["decode_step_ms"]["1"]
    assert one["steps"] >= 3 and 0 < one["ms"] < 10_000  # 4 tokens: the first from the prefill
    assert all(0 < r["prefill_share"] < 1 for r in rows)
    assert KEY not in (tmp_path / "result.json").read_text()
    assert "total tok/s" in (tmp_path / "result.md").read_text()
    assert matplotlib.image.imread(tmp_path / "throughput.png").shape[0] > 100


def test_load_generator_counts_refused_requests_as_errors(server):
    """The load generator (aiohttp): a wrong key gives errors, not an exception; the right one tokens."""
    from quantchat.benchmark.loadtest import run_load

    bad = run_load(server.url, clients=2, requests_per_client=2, max_tokens=3, api_key="wrong")
    assert bad.errors == 4 and bad.requests == 0 and bad.generated_tokens == 0
    good = run_load(server.url, clients=2, requests_per_client=1, max_tokens=3, api_key=KEY)
    assert good.errors == 0 and good.requests == 2 and good.generated_tokens == 6
    assert good.ttft_s["p50"] <= good.latency_s["p50"]


def test_bench_serve_scaling_is_the_median_of_per_round_ratios():
    from quantchat.benchmark.serving import scaling

    rows = [{"clients": 1, "tokens_per_s_rounds": [100.0, 50.0, 100.0]},
            {"clients": 8, "tokens_per_s_rounds": [300.0, 200.0, 250.0]}]
    med, each = scaling(rows, 1, 8)
    assert each == [3.0, 4.0, 2.5] and med == 3.0
    assert scaling(rows, 1, 4) is None


def test_bench_serve_reports_the_batching_gain_of_decode_steps():
    from quantchat.benchmark.serving import batching_gain, time_split

    before = {"steps": {1: [10, 0.1]}, "prefill_s": 1.0}
    after = {"steps": {1: [12, 0.12], 8: [100, 2.0]}, "prefill_s": 1.5}
    split = time_split(before, after, wall=5.0)
    assert split["decode_step_ms"][8] == {"steps": 100, "ms": 20.0} and split["prefill_share"] == 0.1
    assert split["decode_step_ms"][1]["steps"] == 2 and abs(split["decode_step_ms"][1]["ms"] - 10.0) < 1e-9
    rows = [{"clients": 1, "decode_step_ms": {1: {"steps": 50, "ms": 8.0}}, "prefill_share": 0.08},
            {"clients": 8, **split}]
    line = batching_gain(rows, 1, 8)
    assert "3.20x" in line and "8% of the wall time with 1 client(s), 10% with 8" in line
    assert batching_gain(rows[:1], 1, 8) == "" and time_split(None, after, 5.0) == {}
