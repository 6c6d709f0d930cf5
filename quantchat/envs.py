"""Every environment variable quantchat reads, in one place: its name, default and meaning.

Read them as attributes (``envs.QUANTCHAT_HOME``); each read looks at the environment afresh, so tests
and child processes that change it are seen. ``quantchat inspect --env`` prints the table.
Torch-free: the CLI imports this at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    kind: str  # "path" | "str" | "flag" (on when set to anything but "", "0", "false", "no")
    default: str | None
    help: str


VARIABLES: dict[str, EnvVar] = {v.name: v for v in (
    EnvVar("QUANTCHAT_HOME", "path", None,
           "where converted models, quantized checkpoints and results are cached (default ~/.cache/quantchat)"),
    EnvVar("QUANTCHAT_KERNELS_DIR", "path", None,
           "where the C++ kernels are built and cached (default $QUANTCHAT_HOME/kernels)"),
    EnvVar("QUANTCHAT_CPU_VARIANT", "str", None,
           "force a CPU kernel variant no higher than the CPU supports: avx2 | avx512_vnni | amx"),
    EnvVar("QUANTCHAT_NO_KERNELS", "flag", None, "never build or load the C++ kernels (plain torch paths)"),
    EnvVar("QUANTCHAT_NO_FUSED", "flag", None, "decode through the eager model instead of the fused C++ step"),
    EnvVar("QUANTCHAT_NO_Q8", "flag", None,
           "keep float activations in the int4/int8 kernels (no int8/int16 activation quantization)"),
    EnvVar("QUANTCHAT_KEEP_FREED_MEMORY", "str", "1",
           "0: let malloc return freed memory to the system after every step (slower decode)"),
    EnvVar("QUANTCHAT_PROGRESS", "str", "auto",
           "progress output on stderr: auto (bars on a terminal, else only AWQ/GPTQ block lines) "
           "| bar | lines | off"),
    EnvVar("QUANTCHAT_API_KEY", "str", None, "an API key the server requires (also --api-key)"),
    EnvVar("QUANTCHAT_SECRET", "str", None,
           "the cluster's one shared secret, for every role not given its own (also --secret)"),
    EnvVar("QUANTCHAT_WORKER_SECRET", "str", None,
           "the workers' registration secret with the controller (also --worker-secret-file)"),
    EnvVar("QUANTCHAT_ADMIN_SECRET", "str", None,
           "the admin secret API servers send to the controller and workers (also --admin-secret-file)"),
    EnvVar("QUANTCHAT_CHECKPOINT_KEY", "str", None,
           "AES-256 key (64 hex digits) of encrypted quantized checkpoints (also --checkpoint-key-file)"),
    EnvVar("QUANTCHAT_CHECKPOINT_KEY_FILE", "path", None, "file holding QUANTCHAT_CHECKPOINT_KEY"),
    EnvVar("QUANTCHAT_CHECKPOINT_SIGN_KEY", "str", None,
           "HMAC-SHA256 key (hex) of signed checkpoint manifests: set, unsigned checkpoints are refused"),
    EnvVar("QUANTCHAT_CHECKPOINT_SIGN_KEY_FILE", "path", None, "file holding QUANTCHAT_CHECKPOINT_SIGN_KEY"),
    EnvVar("CXX", "str", None, "the C++ compiler for the kernels (default: g++, c++ or clang++)"),
)}

_FALSE = ("", "0", "false", "no", "off")
SECRET_VARIABLES = ("QUANTCHAT_API_KEY", "QUANTCHAT_SECRET", "QUANTCHAT_WORKER_SECRET", "QUANTCHAT_ADMIN_SECRET",
                    "QUANTCHAT_CHECKPOINT_KEY", "QUANTCHAT_CHECKPOINT_SIGN_KEY")


def raw(name: str) -> str | None:
    """The variable's value as set (stripped), else its default."""
    var = VARIABLES[name]
    value = os.environ.get(name)
    value = value.strip() if value is not None else None
    return value if value else var.default


def flag(name: str) -> bool:
    """Whether the switch ``name`` is on."""
    return (os.environ.get(name) or "").strip().lower() not in _FALSE


def __getattr__(name: str):
    var = VARIABLES.get(name)
    if var is None:
        raise AttributeError(f"module 'quantchat.envs' has no attribute '{name}'")
    return flag(name) if var.kind == "flag" else raw(name)


def describe() -> list[dict[str, str | None]]:
    """Every variable with its current value (for ``quantchat inspect --env``); secrets are masked."""
    rows = []
    for v in VARIABLES.values():
        value = os.environ.get(v.name)
        if value and v.name in SECRET_VARIABLES:
            value = "(set)"
        rows.append({"name": v.name, "value": value, "default": v.default, "help": v.help})
    return rows
