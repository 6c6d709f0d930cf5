"""A load generator for a running quantchat (or any OpenAI-compatible) server.

``run_load`` drives ``clients`` concurrent streaming chat clients, each sending ``requests_per_client``
requests back to back, and reports total generated tokens/s, request latency and time-to-first-token
percentiles. Only loopback or explicitly given URLs are contacted.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import aiohttp
import httpx

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give three tips for learning a new language.",
    "What is the capital of France, and why is it famous?",
    "Describe a cat to someone who has never seen one.",
    "Summarize the plot of a detective story you invent.",
    "List five fruits and their colors.",
    "Why do we have seasons on Earth?",
]


@dataclass
class LoadResult:
    clients: int
    requests: int
    errors: int
    generated_tokens: int
    wall_s: float
    tokens_per_s: float
    latency_s: dict[str, float] = field(default_factory=dict)
    ttft_s: dict[str, float] = field(default_factory=dict)
    per_request_tokens_per_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def pick(q: float) -> float:
        return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(v)}


async def one_request(session: aiohttp.ClientSession, url: str, headers: dict, model: str | None, prompt: str,
                      max_tokens: int) -> tuple[float, float, int]:
    """Stream one chat completion; returns (latency, ttft, completion tokens)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.7,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "seed": 0}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        async for raw in r.content:  # one SSE line at a time
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            elif ttft is None and ev["choices"] and ev["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    return latency, ttft if ttft is not None else latency, tokens


async def _run(url: str, clients: int, requests_per_client: int, max_tokens: int, api_key: str | None,
               model: str | None, timeout: float) -> LoadResult:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    ttfts: list[float] = []
    rates: list[float] = []
    total = 0
    errors = 0

    async def client_loop(c: int, session: aiohttp.ClientSession) -> None:
        nonlocal total, errors
        for i in range(requests_per_client):
            prompt = PROMPTS[(c + i) % len(PROMPTS)]
            try:
                lat, ttft, n = await one_request(session, url, headers, model, prompt, max_tokens)
            except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError, ValueError):
                errors += 1
                continue
            latencies.append(lat)
            ttfts.append(ttft)
            total += n
            if n > 1 and lat > ttft:
                rates.append((n - 1) / (lat - ttft))

    # aiohttp rather than httpx: the load generator shares the server's cores, and per streamed token it
    # takes about a third of httpx's CPU time
    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*[client_loop(c, session) for c in range(clients)])
        wall = time.perf_counter() - t0
    return LoadResult(clients=clients, requests=len(latencies), errors=errors, generated_tokens=total, wall_s=wall,
                      tokens_per_s=total / wall if wall > 0 else 0.0, latency_s=percentiles(latencies),
                      ttft_s=percentiles(ttfts), per_request_tokens_per_s=statistics.median(rates) if rates else 0.0)


def run_load(url: str, clients: int, requests_per_client: int = 2, max_tokens: int = 64, api_key: str | None = None,
             model: str | None = None, timeout: float = 600.0) -> LoadResult:
    return asyncio.run(_run(url.rstrip("/"), clients, requests_per_client, max_tokens, api_key, model, timeout))


def wait_healthy(url: str, timeout: float = 300.0, proc=None) -> None:
    """Poll ``url``/health until it answers 200 (or ``proc`` exits, or the timeout passes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url.rstrip("/") + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not become healthy in {timeout:.0f} s")
