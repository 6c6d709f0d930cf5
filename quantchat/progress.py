"""Progress of long steps (conversion, quantization, calibration, checkpoint writes, kernel builds, eval,
bench) on stderr: a tqdm bar on a terminal, nothing otherwise (lines where a step asks for them with
``lines=True``, as AWQ/GPTQ calibration does); ``QUANTCHAT_PROGRESS=lines`` prints a line per step with
the elapsed time and an ETA instead (for logs), ``off`` silences it, ``bar`` forces bars. Torch-free."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from quantchat import envs

T = TypeVar("T")


def mode(lines: bool = False) -> str:
    """"bar", "lines" or "off" for this process: from QUANTCHAT_PROGRESS, else a bar on a terminal
    (``lines`` asks for lines where there is no terminal)."""
    want = (envs.QUANTCHAT_PROGRESS or "auto").lower()
    if want in ("bar", "lines", "off"):
        return want
    if sys.stderr.isatty():
        return "bar"
    return "lines" if lines else "off"


class Progress:
    """One long step of ``total`` units: ``update(n)``, ``close()``; also a context manager. In lines
    mode a line at most every ``every`` seconds (0: one per update), and always one when done."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", lines: bool = False,
                 every: float = 1.0) -> None:
        self.total, self.desc, self.unit, self.done, self.every = total, desc, unit, 0, every
        self.mode = mode(lines)
        self.started = time.perf_counter()
        self._bar = None
        self._last_line = 0.0
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                             dynamic_ncols=True, mininterval=0.2)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self._last_line >= self.every or (self.total is not None and self.done >= self.total):
                self._last_line = now
                print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.started
        if self.total:
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            return f"{self.desc}: {self.done}/{self.total} {self.unit}, {elapsed:.1f} s elapsed, ETA {eta:.1f} s"
        return f"{self.desc}: {self.done} {self.unit}, {elapsed:.1f} s elapsed"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
          lines: bool = False) -> Iterator[T]:
    """Iterate ``items`` with a progress bar (see the module doc)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit, lines) as p:
        for item in items:
            yield item
            p.update()


def callback(desc: str, unit: str = "it", lines: bool = False, every: float = 1.0):
    """A ``progress(done, total)`` callback (the shape the quantizers and converters take) that drives
    one bar; the bar closes when done reaches total."""
    state: dict[str, Progress] = {}

    def report(done: int, total: int) -> None:
        p = state.get("p")
        if p is None:
            p = state["p"] = Progress(total, desc, unit, lines, every)
        if done > p.done:
            p.update(done - p.done)
        if done >= total:
            p.close()
            state.pop("p", None)

    return report
