"""The quantization methods, defined once: the CLI's choices, the quantizer, checkpoint loading, the GGUF
export, the error report and the benchmarks all read this table. Torch-free (the CLI imports it at start-up).
"""

from __future__ import annotations

from dataclasses import dataclass

from quantchat.errors import QuantchatError


@dataclass(frozen=True)
class QuantMethod:
    name: str
    bits: int
    symmetric: bool | None  # None: either (asymmetric unless asked)
    calibrated: bool  # needs calibration text (AWQ, GPTQ); cannot run while loading
    peer_gguf_type: str  # the llama.cpp type of about the same size, for side-by-side numbers
    help: str

    @property
    def load_time(self) -> bool:
        """Whether ``--quant`` can apply it while loading (round-to-nearest, no calibration)."""
        return not self.calibrated


METHODS: dict[str, QuantMethod] = {m.name: m for m in (
    QuantMethod("int8", 8, True, False, "q8_0", "int8 per output channel (symmetric)"),
    QuantMethod("int4-sym", 4, True, False, "q4_0", "int4 group-wise, symmetric, round-to-nearest"),
    QuantMethod("int4-asym", 4, False, False, "q4_1", "int4 group-wise with zero points, round-to-nearest"),
    QuantMethod("awq", 4, None, True, "q4_1", "activation-aware scales and clipping searched on calibration text"),
    QuantMethod("gptq", 4, None, True, "q4_1", "Hessian-based int4 rounding (GPTQ) on calibration text"),
)}
NONE = "none"  # float weights: a choice of --quant and of the benchmarks, not a method
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128


def names() -> tuple[str, ...]:
    return tuple(METHODS)


def load_time_names() -> tuple[str, ...]:
    return tuple(m.name for m in METHODS.values() if m.load_time)


def calibrated_names() -> tuple[str, ...]:
    return tuple(m.name for m in METHODS.values() if m.calibrated)


def get(name: str) -> QuantMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise QuantchatError(f"unknown quantization method '{name}'; choose one of {', '.join(METHODS)}") from None
