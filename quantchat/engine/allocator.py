"""Keep large freed buffers in the process heap instead of returning them to the OS.

glibc's malloc maps every allocation over its (dynamic) mmap threshold afresh and unmaps it when freed,
and trims the heap top; the next allocation then page-faults its pages in again, which is slow in VMs
and sandboxes (about 4 us a page here). A decode step allocates several such tensors (logits, the
float64 CDF of sampling: 3 MB at 8 sequences), so that cost lands on every token: drawing 8 samples took
3.9 ms instead of 0.4. ``keep_freed_memory`` raises the mmap threshold to glibc's maximum and stops
trimming, as the usual MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ environment settings (or jemalloc)
do for CPU inference; the price is that memory freed after a peak stays with the process. No-op
elsewhere than glibc, or with QUANTCHAT_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True if they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("QUANTCHAT_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS now (glibc ``malloc_trim``): after loading, where the
    float weights quantized on the way were freed (about 55 MB on the default model). True if it ran."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
