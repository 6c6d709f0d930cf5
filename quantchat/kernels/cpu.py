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
Opt-in (``path=PATH_AUTO_I16``): a faster GEMV on int16-rounded activations. The paths are the enums
``defs.Path`` / ``defs.R8Path`` (also here as ``PATH_*`` / ``R8_*``), defined once in ``defs.py``, which
also lays out the fused decode step's plan; each build gets them as the generated header ``quantchat_defs.h``.

The C++ source (``cpu_kernels.cpp``) is compiled with the system C++ compiler (``$CXX``, else g++ /
c++; no ninja or setuptools needed) into ``quantchat_home()/kernels`` (``$QUANTCHAT_KERNELS_DIR``
overrides), keyed by a hash of the sources, the generated header, flags, compiler and torch build, with a
progress bar on a terminal while it builds (``quantchat.progress``), and registered as
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from quantchat import envs
from quantchat.kernels import defs
from quantchat.kernels.cpu_features import cpu_flags, cpu_model
from quantchat.paths import quantchat_home
from quantchat.progress import Progress

# the flat names callers use (cpu.PATH_AUTO, cpu.R8_Q8, ...), from the enums of defs.py (what each path does:
# there)
PATHS = {f"PATH_{p.name}": p for p in defs.Path} | {f"R8_{p.name}": p for p in defs.R8Path}
globals().update(PATHS)

__all__ = [
    "KernelsUnavailable", "available", "load", "build_variants", "unavailable_reason", "build_info",
    "int4_linear", "int8_linear", "int4r8_linear", "sample_logits", "VARIANTS", "load_variant",
    "select_variant", "describe", "decode_plan_class", *PATHS,
]

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# every file of the library (compiled together into one .so per ISA variant; the headers are part of the
# cache key)
SOURCES = (SOURCE, SOURCE.with_name("decode_step.cpp"), SOURCE.with_name("sampling.cpp"),
           SOURCE.parent / "x86" / "amx_gemm.cpp")
HEADERS = tuple(sorted(SOURCE.parent.rglob("*.h")))  # cpu_kernels.h, decode_*.h, x86/*.h (included by the sources)
DEFS_HEADER = "quantchat_defs.h"  # defs.header(), written next to each build (the paths, the decode plan's layout)
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c++20", "-DNDEBUG", "-fvisibility=hidden", "-w"]
BUILD_TIMEOUT_S = 600
KEEP_BUILDS = 6  # cached builds kept in kernels_dir() (per ISA variant / source version / torch / compiler)
VARIANT_ENV = "QUANTCHAT_CPU_VARIANT"  # forces a variant (a lower one than the CPU allows, for tests / comparing)


def _forced_variant() -> str:
    return envs.QUANTCHAT_CPU_VARIANT or ""


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: the compiler flags and the CPU flags (``/proc/cpuinfo`` names) it needs.

    Each variant is compiled from the same sources into its own library, with its ops in its own torch
    namespace (``torch.ops.quantchat_<name>``), so that several can be loaded side by side (tests compare
    them); the code paths a variant adds are chosen at compile time (``#ifdef __AVX512VNNI__``, ...).
    """

    name: str
    cxx_flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]
    adds: str  # what it brings over the variant below it

    @property
    def namespace(self) -> str:
        return f"quantchat_{self.name}"


_AVX2 = ("-mavx2", "-mfma", "-mf16c")
_AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni")
_AMX = ("-mavx512bf16", "-mamx-tile", "-mamx-int8", "-mamx-bf16")
# lowest first; select_variant() takes the highest the CPU has
VARIANTS = (
    Variant("avx2", _AVX2, ("avx2", "fma", "f16c"), "AVX2 + FMA + F16C: every kernel"),
    Variant("avx512_vnni", _AVX2 + _AVX512,
            ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
            "AVX-512 VNNI decode GEMVs (vpdpbusd / vpdpwssd: the same exact integer sums as AVX2)"),
    Variant("amx", _AVX2 + _AVX512 + _AMX,
            ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
             "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"),
            "AMX-BF16 tiles for prefill-sized matrices (dequantized bf16 weight panels, float32 sums)"),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
REQUIRED_CPU_FLAGS = VARIANTS[0].cpu_flags


def variant(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KernelsUnavailable(f"unknown CPU kernel variant {name!r} (choose from {', '.join(VARIANT_NAMES)})")


def missing_flags(v: Variant, flags: frozenset[str] | None = None) -> list[str]:
    """The CPU flags ``v`` needs that this CPU lacks (without ``/proc/cpuinfo``: torch's dispatch level
    vouches for AVX2 only)."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        cap = torch.backends.cpu.get_cpu_capability()
        if v.name == "avx2" and cap in ("AVX2", "AVX512"):
            return []
        return [f"{v.name} (no /proc/cpuinfo; torch reports {cap})"]
    return [f for f in v.cpu_flags if f not in flags]


def select_variant(flags: frozenset[str] | None = None, forced: str | None = None) -> tuple[Variant, str]:
    """The variant to use on this CPU and why: the highest whose flags the CPU has, or the one
    ``$QUANTCHAT_CPU_VARIANT`` names (KernelsUnavailable if the CPU lacks what it needs)."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        raise KernelsUnavailable(f"not an x86-64 CPU ({platform.machine()})")
    forced = _forced_variant() if forced is None else forced
    if forced:
        v = variant(forced)
        missing = missing_flags(v, flags)
        if missing:
            raise KernelsUnavailable(f"{VARIANT_ENV}={forced}: the CPU lacks {', '.join(missing)}")
        return v, f"forced by {VARIANT_ENV}={forced}"
    best, why_not = None, ""
    for v in VARIANTS:
        missing = missing_flags(v, flags)
        if missing:
            why_not = f"; not {v.name}: the CPU lacks {', '.join(missing)}"
            break
        best = v
    if best is None:
        raise KernelsUnavailable(f"CPU lacks {', '.join(missing_flags(VARIANTS[0], flags))}")
    return best, f"the best this CPU supports{why_not}"


class KernelsUnavailable(RuntimeError):
    """The C++ kernels cannot be used here (the message says why)."""


_lock = threading.Lock()
_ops = None  # the chosen variant's namespace
_variant: Variant | None = None
_int4_op = None  # the resolved op overloads (a little less call overhead than the packet)
_int8_op = None
_int4r8_op = None
_error: str | None = None
_info: dict = {}
_loaded: dict[str, object] = {}  # variant name -> its torch.ops namespace (every variant loaded here)


# ------------------------------------------------------------------------------------------------
# build and load
# ------------------------------------------------------------------------------------------------
def kernels_dir() -> Path:
    env = envs.QUANTCHAT_KERNELS_DIR
    return Path(env).expanduser() if env else quantchat_home() / "kernels"


def _compiler() -> str:
    for cand in (envs.CXX, "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)  # type: ignore[return-value]
    raise KernelsUnavailable("no C++ compiler found (set $CXX or install g++)")


def _torch_dirs() -> tuple[Path, Path]:
    root = Path(torch.__file__).resolve().parent
    inc, lib = root / "include", root / "lib"
    if not (inc / "torch" / "library.h").is_file():
        raise KernelsUnavailable(f"torch C++ headers not found under {inc}")
    return inc, lib


def _variant_flags(v: Variant) -> list[str]:
    return [*CXX_FLAGS, *v.cxx_flags, f"-DQC_NS={v.namespace}", f"-DQC_VARIANT=\"{v.name}\""]


def _compile_commands(cxx: str, v: Variant, objects: list[Path], defs_dir: Path) -> list[list[str]]:
    """One ``-c`` command per source (they run side by side: most of the time is parsing torch headers);
    ``defs_dir`` holds ``quantchat_defs.h``."""
    inc, _ = _torch_dirs()
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags = [f for f in _variant_flags(v) if f != "-shared"]
    return [[cxx, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{inc}", f"-I{SOURCE.parent}", f"-I{defs_dir}",
             "-c", str(src), "-o", str(obj)] for src, obj in zip(SOURCES, objects)]


def _link_command(cxx: str, objects: list[Path], out: Path) -> list[str]:
    _, lib = _torch_dirs()
    return [cxx, "-shared", "-fopenmp", *map(str, objects), "-o", str(out),
            f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]


def _run_build(cxx: str, v: Variant, out: Path) -> None:
    """Compile the sources in parallel and link them into ``out`` (a progress bar per source and the
    link); KernelsUnavailable with the compiler's message when that fails."""
    objects = [out.with_name(f"{out.stem}.{i}.o") for i in range(len(SOURCES))]
    defs_dir = out.with_name(f"{out.stem}.include")
    progress = Progress(len(SOURCES) + 1, f"building CPU kernels ({v.name})", unit="step")
    try:
        defs_dir.mkdir(exist_ok=True)
        (defs_dir / DEFS_HEADER).write_text(defs.header())
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in _compile_commands(cxx, v, objects, defs_dir)]
        results = []
        with ThreadPoolExecutor(len(procs)) as pool:  # the bar moves as each compile finishes
            futures = {pool.submit(p.communicate, timeout=BUILD_TIMEOUT_S): p for p in procs}
            for f in as_completed(futures):
                results.append((futures[f], f.result()[0]))
                progress.update()
        for p, output in results:
            if p.returncode != 0:
                raise KernelsUnavailable(f"compilation failed ({cxx}, exit {p.returncode}):\n{output.strip()[-2000:]}")
        res = subprocess.run(_link_command(cxx, objects, out), capture_output=True, text=True,
                             timeout=BUILD_TIMEOUT_S)
        progress.update()
        if res.returncode != 0 or not out.is_file():
            tail = (res.stderr or res.stdout).strip()[-2000:]
            raise KernelsUnavailable(f"linking failed ({cxx}, exit {res.returncode}):\n{tail}")
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelsUnavailable(f"compiler failed to run: {e}") from e
    finally:
        progress.close()
        for o in objects:
            o.unlink(missing_ok=True)
        shutil.rmtree(defs_dir, ignore_errors=True)


def _cache_key(cxx: str, v: Variant) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelsUnavailable(f"C++ compiler {cxx} does not run: {e}") from e
    h = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), defs.header().encode(),
                 " ".join(_variant_flags(v)).encode(), cxx.encode(),
                 version.encode(), torch.__version__.encode(), str(getattr(torch.version, "git_version", "")).encode(),
                 str(Path(torch.__file__).resolve().parent).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _prebuilt_key(v: Variant) -> str:
    """What a build must match to be loaded without a compiler (an image's runtime stage): the sources,
    the generated header, the flags and the torch build, but not the compiler that made it."""
    h = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), defs.header().encode(),
                 " ".join(_variant_flags(v)).encode(), torch.__version__.encode(),
                 str(getattr(torch.version, "git_version", "")).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _key_file(so_path: Path) -> Path:
    return so_path.with_suffix(".key")


def _write_key_file(v: Variant, so_path: Path) -> None:
    try:
        if not _key_file(so_path).is_file():
            _key_file(so_path).write_text(_prebuilt_key(v) + "\n")
    except OSError:  # a read-only kernels folder: the build stays usable where a compiler is
        pass


def _prebuilt(v: Variant) -> Path | None:
    """A build of ``v`` made elsewhere (by ``quantchat prepare`` in an image's build stage) whose key
    matches these sources and this torch, or None."""
    key = _prebuilt_key(v)
    for so in sorted(kernels_dir().glob(f"quantchat_cpu_{v.name}_*.so")):
        try:
            if _key_file(so).read_text().strip() == key:
                return so
        except OSError:
            continue
    return None


def build_variants(names: tuple[str, ...] = VARIANT_NAMES) -> dict[str, float]:
    """Compile the named variants into kernels_dir() without loading them (any x86-64 CPU can compile
    the code for a CPU it is not: an image's build stage makes every variant); seconds per variant."""
    cxx = _compiler()
    out = {}
    for name in names:
        v = variant(name)
        so_path = kernels_dir() / f"quantchat_cpu_{v.name}_{_cache_key(cxx, v)}.so"
        out[name] = _build(cxx, v, so_path) if not so_path.is_file() else 0.0
        _write_key_file(v, so_path)
    return out


def _build(cxx: str, v: Variant, so_path: Path) -> float:
    """Compile into so_path (under a file lock; another process may have built it meanwhile)."""
    import fcntl  # POSIX only: here, not at the top, so that the module imports (kernels unavailable) elsewhere

    so_path.parent.mkdir(parents=True, exist_ok=True)
    with open(so_path.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if so_path.is_file():
            return 0.0
        tmp = so_path.with_name(f".{so_path.stem}.{os.getpid()}.tmp.so")
        t0 = time.perf_counter()
        try:
            _run_build(cxx, v, tmp)
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
            _key_file(old).unlink(missing_ok=True)
            old.unlink()
        except OSError:
            pass


def _registered(v: Variant) -> bool:
    try:
        getattr(torch.ops, v.namespace).int4_linear.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _load_variant_impl(v: Variant) -> tuple[object, dict]:
    """Build (once) and load variant ``v``; its ops namespace and how it was got."""
    missing = missing_flags(v)
    if missing:  # never load code with instructions the CPU lacks
        raise KernelsUnavailable(f"the CPU lacks {', '.join(missing)} for the {v.name} kernels")
    info: dict = {}
    if not _registered(v):
        try:
            cxx = _compiler()
        except KernelsUnavailable as e:  # no compiler (an image's runtime stage): a matching prebuilt build
            so_path = _prebuilt(v)
            if so_path is None:
                raise KernelsUnavailable(f"{e}, and no prebuilt {v.name} build in {kernels_dir()} matches "
                                         "(quantchat prepare --all-kernel-variants makes them)") from None
            cxx, build_s = "prebuilt", 0.0
        else:
            so_path = kernels_dir() / f"quantchat_cpu_{v.name}_{_cache_key(cxx, v)}.so"
            build_s = _build(cxx, v, so_path) if not so_path.is_file() else 0.0
            _write_key_file(v, so_path)
        try:
            os.utime(so_path)  # "recently used", for _prune
        except OSError:
            pass
        try:
            torch.ops.load_library(str(so_path))
        except OSError as e:
            raise KernelsUnavailable(f"cannot load {so_path}: {e}") from e
        info.update(path=str(so_path), build_s=build_s, compiler=cxx)
    ops = getattr(torch.ops, v.namespace)
    info["blas"] = "sgemm_" if ops.kernels_info() else "at::mm"
    info["variant"] = v.name
    info["isa"] = ops.isa_info()
    # smoke test: catches a broken build before any model uses it
    x = torch.ones(1, 16)
    y = ops.int8_linear(x, torch.ones(2, 16, dtype=torch.int8), torch.full((2,), 0.5), defs.Path.AUTO)
    if not torch.equal(y, torch.full((1, 2), 8.0)):
        raise KernelsUnavailable(f"kernel smoke test of the {v.name} build gave a wrong result")
    return ops, info


def load_variant(name: str):
    """The ops namespace of one variant (built and loaded on first use; tests compare variants with it).
    KernelsUnavailable when the CPU or the compiler cannot give it."""
    with _lock:
        if name not in _loaded:
            ops, info = _load_variant_impl(variant(name))
            _loaded[name] = ops
            _info.setdefault("variants", {})[name] = info
        return _loaded[name]


def _load_impl() -> tuple[object, Variant]:
    if envs.QUANTCHAT_NO_KERNELS:
        raise KernelsUnavailable("disabled by QUANTCHAT_NO_KERNELS")
    chosen, why = select_variant()
    tried = []
    for v in reversed(VARIANTS[:VARIANTS.index(chosen) + 1]):  # a build that fails falls back to the one below
        try:
            ops, info = _load_variant_impl(v)
        except KernelsUnavailable as e:
            if _forced_variant():
                raise
            tried.append(f"{v.name}: {e}")
            continue
        _loaded[v.name] = ops
        _info.update(info)
        _info["why"] = why if v is chosen else \
            f"{chosen.name} failed ({'; '.join(t.splitlines()[0] for t in tried)})"
        _info["cpu"] = cpu_model()
        return ops, v
    raise KernelsUnavailable("; ".join(tried))


def load():
    """Build (first time) and load the kernels of the best variant for this CPU; returns its
    ``torch.ops`` namespace (``torch.ops.quantchat_<variant>``).

    Raises ``KernelsUnavailable`` with the reason when they cannot be used here.
    """
    global _ops, _error, _int4_op, _int8_op, _int4r8_op, _variant
    if _ops is not None:
        return _ops
    with _lock:
        if _ops is None:
            if _error is not None:
                raise KernelsUnavailable(_error)
            try:
                ops, v = _load_impl()
                _int4_op, _int8_op = ops.int4_linear.default, ops.int8_linear.default
                _int4r8_op = ops.int4r8_linear.default
                _variant = v
                _ops = ops
            except KernelsUnavailable as e:
                _error = str(e)
                raise
            except Exception as e:  # noqa: BLE001 - any failure means "use torch's ops"
                _error = f"{type(e).__name__}: {e}"
                raise KernelsUnavailable(_error) from e
    return _ops


def loaded_variant() -> Variant:
    """The variant in use (loads the kernels)."""
    load()
    assert _variant is not None
    return _variant


def decode_plan_class():
    """The fused decode step's class (``DecodePlan`` of decode_step.cpp) of the variant in use."""
    load()
    return getattr(torch.classes, loaded_variant().namespace).DecodePlan


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
    """Where the library is, how long the build took this process (0.0 = cached), the BLAS used, the
    variant in use and why, what its ISA code paths are (``isa``)."""
    return dict(_info)


def describe() -> dict:
    """What ``quantchat inspect --cpu`` prints: the CPU, its relevant flags, every variant with whether this
    CPU can run it, the one in use and why, and its code paths (loads the kernels)."""
    flags = cpu_flags()
    wanted = sorted({f for v in VARIANTS for f in v.cpu_flags})
    out: dict = {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "flags": {f: (None if flags is None else f in flags) for f in wanted},
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "variants": [{"name": v.name, "adds": v.adds, "missing": missing_flags(v)} for v in VARIANTS],
        "forced": _forced_variant() or None,
    }
    if available():
        info = build_info()
        out.update(variant=info.get("variant"), why=info.get("why"), isa=info.get("isa"),
                   library=info.get("path"), blas=info.get("blas"))
    else:
        out.update(variant=None, why=unavailable_reason())
    return out


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
    path: int = defs.Path.AUTO,
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


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, path: int = defs.Path.AUTO) -> Tensor:
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
    in_features: int, path: int = defs.R8Path.EXACT,
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
