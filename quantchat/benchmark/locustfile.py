"""The locust user of ``quantchat bench serve --locust`` (run by locust in its own process: locust's gevent
patches the standard library, so this file is never imported by quantchat itself).

Each user streams chat completions from the API (``--host``) one after another and reports each as one
locust request, timed to the last token; a stream that ends with an error event is a failure. With
``$QUANTCHAT_LOCUST_LOG`` every request is also written there as JSON lines (when it begins; when it ends: start, end, ok,
error; or when locust stops the user in the middle of it, at the end of the run): the
runner checks from it which requests failed when a worker was killed. Settings: ``$QUANTCHAT_LOCUST_API_KEY``,
``$QUANTCHAT_LOCUST_MAX_TOKENS`` (default 32), ``$QUANTCHAT_LOCUST_TIMEOUT`` (seconds per request, default 60).
"""

from __future__ import annotations

import json
import os
import time

import requests
from locust import User, between, task

PROMPTS = ["Write a haiku about the sea.", "Explain what a CPU cache is.", "Name three prime numbers.",
           "Give me a tip for learning to cook.", "What is the capital of France?", "Describe a sunset."]
LOG = os.environ.get("QUANTCHAT_LOCUST_LOG")
_log = open(LOG, "a", buffering=1) if LOG else None  # noqa: SIM115 - one line per request, for the whole run


class ChatUser(User):
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        self.session = requests.Session()
        key = os.environ.get("QUANTCHAT_LOCUST_API_KEY")
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.max_tokens = int(os.environ.get("QUANTCHAT_LOCUST_MAX_TOKENS", "32"))
        self.timeout = float(os.environ.get("QUANTCHAT_LOCUST_TIMEOUT", "60"))
        self.n = 0

    @task
    def chat(self) -> None:
        self.n += 1
        body = {"messages": [{"role": "user", "content": PROMPTS[self.n % len(PROMPTS)]}],
                "max_tokens": self.max_tokens, "temperature": 0.7, "stream": True, "ignore_eos": True}
        start, t0 = time.time(), time.perf_counter()
        rid = f"{id(self):x}-{self.n}"
        if _log is not None:  # a begin line, so that a request that never ends shows
            _log.write(json.dumps({"id": rid, "begin": start}) + "\n")
        error, length = None, 0
        try:
            with self.session.post(self.host.rstrip("/") + "/v1/chat/completions", json=body, stream=True,
                                   timeout=self.timeout) as r:
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    done = False
                    for line in r.iter_lines():
                        length += len(line)
                        if line.startswith(b"data: {") and b'"error"' in line:
                            error = "stream error: " + json.loads(line[6:]).get("error", {}).get("message", "")
                            break
                        done = done or line == b"data: [DONE]"
                    if error is None and not done:
                        error = "the stream ended without [DONE]"
        except requests.RequestException as e:
            error = f"{type(e).__name__}: {e}"
        except BaseException:  # GreenletExit: locust stopping this user at the end of the run
            if _log is not None:
                _log.write(json.dumps({"id": rid, "interrupted": time.time()}) + "\n")
            raise
        elapsed_ms = (time.perf_counter() - t0) * 1000
        self.environment.events.request.fire(
            request_type="POST", name="/v1/chat/completions (stream)", response_time=elapsed_ms,
            response_length=length, exception=RuntimeError(error) if error else None, context={})
        if _log is not None:
            _log.write(json.dumps({"id": rid, "start": start, "end": time.time(), "ok": error is None,
                                   "error": error}) + "\n")
