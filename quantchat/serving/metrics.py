"""The API's counters and their Prometheus text (``/metrics``)."""

from __future__ import annotations

import collections
import time
from typing import Any


class Metrics:
    """Request counts by route and status, token counters and a 10 s tokens/s window."""

    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)

    def add_tokens(self, n: int) -> None:
        self.generation_tokens += n
        now = time.monotonic()
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - 10.0:
            self.recent.popleft()

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - 10.0:
            self.recent.popleft()
        return sum(n for _, n in self.recent) / 10.0

    def render(self, backend_stats: dict[str, Any]) -> str:
        lines = ["# HELP quantchat_requests_total HTTP requests by route and status",
                 "# TYPE quantchat_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'quantchat_requests_total{{route="{route}",status="{status}"}} {n}')
        gauges = {
            "quantchat_prompt_tokens_total": ("counter", "prompt tokens processed", self.prompt_tokens),
            "quantchat_generation_tokens_total": ("counter", "tokens generated", self.generation_tokens),
            "quantchat_generation_tokens_per_second": ("gauge", "tokens generated per second, last 10 s",
                                                       self.tokens_per_s()),
            "quantchat_queue_length": ("gauge", "requests waiting for a slot", backend_stats.get("queue_length", 0)),
            "quantchat_running_batch": ("gauge", "sequences in the running batch",
                                        backend_stats.get("running_batch", 0)),
            "quantchat_kv_cache_usage_ratio": ("gauge", "fraction of KV-cache positions in use",
                                               backend_stats.get("kv_cache_usage", 0.0)),
        }
        if "prompt_tokens_cached_total" in backend_stats:
            gauges["quantchat_prompt_tokens_cached_total"] = (
                "counter", "prompt tokens whose KV was reused from a slot (prefix reuse)",
                backend_stats["prompt_tokens_cached_total"])
        if "workers" in backend_stats:
            gauges["quantchat_workers"] = ("gauge", "live workers", backend_stats["workers"])
        if "prefill_seconds_total" in backend_stats:
            gauges["quantchat_prefill_seconds_total"] = ("counter", "seconds the worker spent prefilling prompts",
                                                         backend_stats["prefill_seconds_total"])
        for name, (kind, help_, value) in gauges.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {float(value):g}"]
        by_batch = sorted((int(b), v) for b, v in (backend_stats.get("decode_time_by_batch") or {}).items())
        if by_batch:
            for name, help_, i in (("quantchat_decode_steps_total", "decode steps by running batch size", 0),
                                   ("quantchat_decode_seconds_total",
                                    "seconds in decode steps (model, sampling, events) by batch size", 1)):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
                lines += [f'{name}{{batch="{b}"}} {float(v[i]):g}' for b, v in by_batch]
        return "\n".join(lines) + "\n"

