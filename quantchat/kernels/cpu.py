"""Fast weight-only int4 / int8 linears for x86-64 CPUs with AVX2 + FMA (C++ extension, built on first use).

torch's own weight-only CPU kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) are
slower than a float32 matmul on AVX2-only CPUs. These kernels read the portable formats of
``quantchat.quant.rtn`` as stored (no repacking):

* ``int4_linear(x, packed, scales, mins, group_size, in_features)``: packed uint8 [N, Kp/2] (byte j
  holds column 2j in its low nibble, 2j+1 in its high nibble), scales float16 [N, G], mins float16
  [N, G]; w = code * scale + min per group (``rtn.int4_resident`` makes scales / mins from zero
  points; read with F16C). x has ``in_features`` columns (no padding needed).
* ``int8_linear(x, qweight, scales)``: qweight int8 [N, K], scales float32 [N]; w = q * scale.
* ``int4r8_linear(x, packed, scales, mins, out_features, group_size, in_features, path)``: the same int4
  weights with rows interleaved in blocks of 8 (``rtn.interleave_rows8``, made at load), for the decode
  GEMV on int8-rounded activations (``R8_Q8``: vpmaddubsw over 8 rows at once; what the fused decode
  step runs), a GEMM on int16-rounded activations (``R8_I16``: vpmaddwd; what prefill runs) or dequantized
  tiles + sgemm on the float activations (``R8_EXACT``).

Small M (decode, M <= 12) runs a float32 GEMV straight from the packed codes (AVX2 unpack + FMA,
threads split the output rows); larger M (prefill) dequantizes tiles of rows into an L2-sized
float32 buffer per thread and runs sgemm on them. Results match dequantize-then-matmul to float32
rounding (the activations are not quantized). Threads: torch's pool (``torch.get_num_threads()``).
Opt-in (``path=PATH_AUTO_I16``): a faster GEMV on int16-rounded activations (see below).

The C++ source (``cpu_kernels.cpp``) is compiled with the system C++ compiler (``$CXX``, else g++ /
c++; no ninja or setuptools needed) into ``quantchat_home()/kernels`` (``$QUANTCHAT_KERNELS_DIR``
overrides), keyed by a hash of the source, flags, compiler and torch build, and registered as
``torch.ops.quantchat.int4_linear`` / ``int8_linear``. When it cannot be built or loaded (no
compiler, no AVX2/FMA, not x86-64, ``QUANTCHAT_NO_KERNELS=1``) ``available()`` is False and
``unavailable_reason()`` says why; callers then use torch's ops.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from quantchat.paths import quantchat_home

__all__ = [
    "KernelsUnavailable", "available", "load", "unavailable_reason", "build_info",
    "int4_linear", "int8_linear", "int4r8_linear", "sample_logits", "R8_EXACT", "R8_Q8", "R8_EXACT_SMALL", "R8_I16",
    "PATH_AUTO", "PATH_GEMV", "PATH_TILED", "PATH_GEMV_I16", "PATH_AUTO_I16",
]

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# every file of the library (compiled together into one .so; the header is part of the cache key)
SOURCES = (SOURCE, SOURCE.with_name("decode_step.cpp"), SOURCE.with_name("sampling.cpp"))
HEADERS = (SOURCE.with_name("cpu_kernels.h"),)
CXX_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-std=c++20", "-DNDEBUG",
             "-fvisibility=hidden", "-w"]
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
BUILD_TIMEOUT_S = 600
KEEP_BUILDS = 4  # cached builds kept in kernels_dir() (one per source version / torch / compiler)

# kernel choice (the ``path`` argument): AUTO = float GEMV for M <= 12, tiles + sgemm above; GEMV / TILED
# force one (tests, benchmarks). Opt-in: GEMV_I16 = GEMV with the activations rounded to int16 (int4: per
# weight group, int8: per row; exact integer products; int4 ~1.2-1.7x, int8 ~1.1x faster than the float
# GEMV; output error ~2e-5 of its magnitude: far below bfloat16 rounding, but not float32-exact; int8
# rows come out the same in any batch); AUTO_I16 = that GEMV for M <= 12, above it tiles (int4) or a GEMM
# on int16 activations per 128 columns (int8: QuantizedLinear's default, prefill). The fused decode step
# runs int8 layers (the LM head) on GEMV_I16.
PATH_AUTO, PATH_GEMV, PATH_TILED, PATH_GEMV_I16, PATH_AUTO_I16 = 0, 1, 2, 3, 4
# int4r8_linear's paths: EXACT = float32 activations (up to 16 rows: one 8-row block dequantized into L1 at
# a time and multiplied with up to 6 rows at once, each row's sums in a fixed order; above: dequantized
# tiles + sgemm); Q8 = GEMV on int8 activations (per 32 columns, as llama.cpp's Q8_0): the decode path,
# 2-3x the float GEMV's speed; EXACT_SMALL = EXACT's small-M kernel at any M (tests, benchmarks); I16 =
# GEMM on int16 activations (per row and weight group; vpmaddwd on 16 rows unpacked at a time, a 6 x 16
# register block): the prefill path (QuantizedLinear's default), 1.1-2.3x EXACT at every M, output error
# ~3e-5 of its magnitude, each row's result independent of the other rows
R8_EXACT, R8_Q8, R8_EXACT_SMALL, R8_I16 = 0, 1, 2, 3


class KernelsUnavailable(RuntimeError):
    """The C++ kernels cannot be used here (the message says why)."""


_lock = threading.Lock()
_ops = None
_int4_op = None  # the resolved op overloads (a little less call overhead than the packet)
_int8_op = None
_int4r8_op = None
_error: str | None = None
_info: dict = {}


# ------------------------------------------------------------------------------------------------
# build and load
# ------------------------------------------------------------------------------------------------
def kernels_dir() -> Path:
    env = os.environ.get("QUANTCHAT_KERNELS_DIR")
    return Path(env).expanduser() if env else quantchat_home() / "kernels"


def _cpu_check() -> None:
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        raise KernelsUnavailable(f"not an x86-64 CPU ({platform.machine()})")
    flags: set[str] | None = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if flags is not None:
        missing = [f for f in REQUIRED_CPU_FLAGS if f not in flags]
        if missing:
            raise KernelsUnavailable(f"CPU lacks {', '.join(missing)}")
    else:  # no /proc/cpuinfo: trust torch's own dispatch level
        cap = torch.backends.cpu.get_cpu_capability()
        if cap not in ("AVX2", "AVX512"):
            raise KernelsUnavailable(f"CPU capability {cap} (needs AVX2 + FMA)")


def _compiler() -> str:
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)  # type: ignore[return-value]
    raise KernelsUnavailable("no C++ compiler found (set $CXX or install g++)")


def _torch_dirs() -> tuple[Path, Path]:
    root = Path(torch.__file__).resolve().parent
    inc, lib = root / "include", root / "lib"
    if not (inc / "torch" / "library.h").is_file():
        raise KernelsUnavailable(f"torch C++ headers not found under {inc}")
    return inc, lib


def _compile_commands(cxx: str, objects: list[Path]) -> list[list[str]]:
    """One ``-c`` command per source (they run side by side: most of the time is parsing torch headers)."""
    inc, _ = _torch_dirs()
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags = [f for f in CXX_FLAGS if f != "-shared"]
    return [[cxx, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{inc}", "-c", str(src), "-o", str(obj)]
            for src, obj in zip(SOURCES, objects)]


def _link_command(cxx: str, objects: list[Path], out: Path) -> list[str]:
    _, lib = _torch_dirs()
    return [cxx, "-shared", "-fopenmp", *map(str, objects), "-o", str(out),
            f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]


def _run_build(cxx: str, out: Path) -> None:
    """Compile the sources in parallel and link them into ``out``; KernelsUnavailable with the compiler's
    message when that fails."""
    objects = [out.with_name(f"{out.stem}.{i}.o") for i in range(len(SOURCES))]
    try:
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in _compile_commands(cxx, objects)]
        results = [(p, p.communicate(timeout=BUILD_TIMEOUT_S)[0]) for p in procs]
        for p, output in results:
            if p.returncode != 0:
                raise KernelsUnavailable(f"compilation failed ({cxx}, exit {p.returncode}):\n{output.strip()[-2000:]}")
        res = subprocess.run(_link_command(cxx, objects, out), capture_output=True, text=True,
                             timeout=BUILD_TIMEOUT_S)
        if res.returncode != 0 or not out.is_file():
            tail = (res.stderr or res.stdout).strip()[-2000:]
            raise KernelsUnavailable(f"linking failed ({cxx}, exit {res.returncode}):\n{tail}")
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelsUnavailable(f"compiler failed to run: {e}") from e
    finally:
        for o in objects:
            o.unlink(missing_ok=True)


def _cache_key(cxx: str) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelsUnavailable(f"C++ compiler {cxx} does not run: {e}") from e
    h = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(CXX_FLAGS).encode(), cxx.encode(), version.encode(),
                 torch.__version__.encode(), str(getattr(torch.version, "git_version", "")).encode(),
                 str(Path(torch.__file__).resolve().parent).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _build(cxx: str, so_path: Path) -> float:
    """Compile into so_path (under a file lock; another process may have built it meanwhile)."""
    import fcntl

    so_path.parent.mkdir(parents=True, exist_ok=True)
    with open(so_path.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if so_path.is_file():
            return 0.0
        tmp = so_path.with_name(f".{so_path.stem}.{os.getpid()}.tmp.so")
        t0 = time.perf_counter()
        try:
            _run_build(cxx, tmp)
        except KernelsUnavailable:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, so_path)
        _prune(so_path.parent, keep=KEEP_BUILDS)
        return time.perf_counter() - t0


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently used builds (other sources / torch versions)."""
    builds = sorted(folder.glob("quantchat_cpu_*.so"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[keep:]:
        try:
            old.unlink()
        except OSError:
            pass


def _registered() -> bool:
    try:
        torch.ops.quantchat.int4_linear.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def env_flag(name: str) -> bool:
    """Whether the environment switch ``name`` is on (set to anything but empty or 0)."""
    return os.environ.get(name, "").strip() not in ("", "0")


def _load_impl():
    if env_flag("QUANTCHAT_NO_KERNELS"):
        raise KernelsUnavailable("disabled by QUANTCHAT_NO_KERNELS")
    _cpu_check()
    if not _registered():
        cxx = _compiler()
        so_path = kernels_dir() / f"quantchat_cpu_{_cache_key(cxx)}.so"
        build_s = _build(cxx, so_path) if not so_path.is_file() else 0.0
        try:
            os.utime(so_path)  # "recently used", for _prune
        except OSError:
            pass
        try:
            torch.ops.load_library(str(so_path))
        except OSError as e:
            raise KernelsUnavailable(f"cannot load {so_path}: {e}") from e
        _info.update(path=str(so_path), build_s=build_s, compiler=cxx)
    ops = torch.ops.quantchat
    _info["blas"] = "sgemm_" if ops.kernels_info() else "at::mm"
    # smoke test: catches a broken build before any model uses it
    x = torch.ones(1, 16)
    y = ops.int8_linear(x, torch.ones(2, 16, dtype=torch.int8), torch.full((2,), 0.5))
    if not torch.equal(y, torch.full((1, 2), 8.0)):
        raise KernelsUnavailable("kernel smoke test gave a wrong result")
    return ops


def load():
    """Build (first time) and load the kernels; returns the ``torch.ops.quantchat`` namespace.

    Raises ``KernelsUnavailable`` with the reason when they cannot be used here.
    """
    global _ops, _error, _int4_op, _int8_op, _int4r8_op
    if _ops is not None:
        return _ops
    with _lock:
        if _ops is None:
            if _error is not None:
                raise KernelsUnavailable(_error)
            try:
                ops = _load_impl()
                _int4_op, _int8_op = ops.int4_linear.default, ops.int8_linear.default
                _int4r8_op = ops.int4r8_linear.default
                _ops = ops
            except KernelsUnavailable as e:
                _error = str(e)
                raise
            except Exception as e:  # noqa: BLE001 - any failure means "use torch's ops"
                _error = f"{type(e).__name__}: {e}"
                raise KernelsUnavailable(_error) from e
    return _ops


def is_built() -> bool:
    """Loaded already, or some build is cached (a first build takes about 12 s)."""
    return _ops is not None or any(kernels_dir().glob("quantchat_cpu_*.so"))


def available() -> bool:
    """True when the kernels are built and loaded (builds them on the first call)."""
    try:
        load()
        return True
    except KernelsUnavailable:
        return False


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when available or not tried yet)."""
    return _error


def build_info() -> dict:
    """Where the library is, how long the build took this process (0.0 = cached), the BLAS used."""
    return dict(_info)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
def _as_float_2d(x: Tensor, k: int) -> tuple[Tensor, tuple[int, ...], torch.dtype]:
    shape, dtype = tuple(x.shape), x.dtype
    if x.dim() != 2:
        x = x.reshape(-1, shape[-1])
    if dtype != torch.float32:
        x = x.float()
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features, the weight expects {k}")
    return x, shape, dtype


def _restore(y: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    if len(shape) != 2:
        y = y.view(*shape[:-1], y.shape[-1])
    return y if dtype == torch.float32 else y.to(dtype)


def int4_linear(
    x: Tensor, packed: Tensor, scales: Tensor, mins: Tensor, group_size: int, in_features: int,
    path: int = PATH_AUTO,
) -> Tensor:
    """``x @ W.T`` with ``W = rtn.dequantize_int4_resident(unpack(packed), scales, mins)``, for x
    [..., in_features]; output [..., N]. scales and mins: float16 [N, G] (``rtn.int4_resident``).

    x of another float dtype (bfloat16) is computed in float32 and returned in its dtype.
    ``path``: ``PATH_AUTO`` (default), or see the PATH_* constants (int16-activation GEMV: opt-in).
    """
    op = _int4_op
    if op is None:
        load()
        op = _int4_op
    if scales.dtype != torch.float16 or mins.dtype != torch.float16:
        raise TypeError(f"int4_linear takes float16 scales and mins (got {scales.dtype}, {mins.dtype}); "
                        "make them from scales and zero points with quantchat.quant.rtn.int4_resident")
    x2, shape, dtype = _as_float_2d(x, in_features)
    y = op(x2, packed, scales, mins, group_size, in_features, path)
    return _restore(y, shape, dtype)


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, path: int = PATH_AUTO) -> Tensor:
    """``x @ (qweight * scales[:, None]).T`` for x [..., K]; output [..., N]."""
    op = _int8_op
    if op is None:
        load()
        op = _int8_op
    x2, shape, dtype = _as_float_2d(x, qweight.shape[1])
    y = op(x2, qweight, scales, path)
    return _restore(y, shape, dtype)


def int4r8_linear(
    x: Tensor, packed: Tensor, scales: Tensor, mins: Tensor, out_features: int, group_size: int,
    in_features: int, path: int = R8_EXACT,
) -> Tensor:
    """``int4_linear`` on weights in the row-interleaved layout of ``rtn.interleave_rows8`` (packed uint8
    [N8, Kp/2], scales / mins float16 [N8, G]); output [..., out_features]. ``R8_EXACT`` (default):
    float32 activations, dequantized tiles; ``R8_Q8``: activations rounded to int8 per 32 columns;
    ``R8_I16``: rounded to int16 per row and weight group (the prefill GEMM)."""
    op = _int4r8_op
    if op is None:
        load()
        op = _int4r8_op
    x2, shape, dtype = _as_float_2d(x, in_features)
    y = op(x2, packed, scales, mins, out_features, group_size, in_features, path)
    return _restore(y, shape, dtype)


def sample_logits(logits: Tensor, inv_temp: Tensor, u: Tensor) -> Tensor:
    """Token ids [B] drawn from logits [B, V] (float32) at temperatures 1 / inv_temp [B] (float32) with the
    uniform numbers u [B] (float64, in [0, 1)): the inverse CDF of softmax(logits * inv_temp) at u, as
    ``quantchat.sampling.sampling.draw_rows`` (see sampling.cpp); -1 for a row with no finite logit."""
    return load().sample_logits(logits, inv_temp, u)
