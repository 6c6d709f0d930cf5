"""What the CPU is and which instruction-set features it has, from ``/proc/cpuinfo`` (no torch import: the
CLI and the benchmark's machine report read it too)."""

from __future__ import annotations

import functools
import platform


@functools.cache
def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (None where there is no ``/proc/cpuinfo``)."""
    flags = _cpuinfo_field("flags")
    return None if flags is None else frozenset(flags.split())


def cpu_model() -> str:
    """The CPU's model name, or the platform's processor string."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()
