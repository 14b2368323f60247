"""glibc malloc settings for PyTorch on CPU, applied when `aidc` is imported.

glibc's defaults serve every allocation above 128 KiB with a fresh `mmap` and hand freed memory at the top
of the heap back to the kernel (the thresholds adapt only part of the way). A CPU forward allocates and frees
activation tensors of hundreds of KiB to a few MiB each time, so with those defaults every forward pays page
faults and the kernel zeroes the same pages again. Measured on the 2-core dev machine, one torch thread:
MNIST CNN forward at batch 32 11.3 -> 6.9 ms (batch 1 unchanged); GPT decode step, 16 sequences over 190
positions, 7.7 -> 1.6 ms. PyTorch's CPU performance guide gives the same advice as "preload jemalloc or
tcmalloc"; two `mallopt` calls get it from the allocator already there, in every process that imports aidc
(drivers, Ray Train workers, Serve replicas, Ray Data actors, and the benchmarks' baselines alike).

What it costs: a process keeps up to TRIM_BYTES of freed heap instead of returning it at once.
Skipped when `AIDC_MALLOC_TUNING=0`, when the environment already sets glibc's `MALLOC_TRIM_THRESHOLD_` or
`MALLOC_MMAP_THRESHOLD_` (yours win), and where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_BYTES = 32 * 2**20  # glibc's largest allowed mmap threshold on 64-bit
TRIM_BYTES = 128 * 2**20

_applied: bool | None = None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds in this process (once). True when they are set."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("AIDC_MALLOC_TUNING", "1") == "0" \
            or "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no such thresholds)
    except (OSError, AttributeError):
        return False
    # both or neither: setting one switches off glibc's dynamic thresholds and leaves the other at its default
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
    return _applied
