"""Keep freed host memory in the process: the CPU counterpart of a caching allocator.

A training step allocates and frees the same activation-sized arrays (a few MiB each) every step.
glibc's malloc serves blocks above its mmap threshold (128 KiB at start, adapting upward) with
fresh mmap'd pages and returns freed memory at the top of the heap to the kernel past its trim
threshold, so the next step touches new pages: the kernel zero-fills each 4 KiB page on its
first write (a minor page fault). Measured on the benchmark model (benchmarks/lora.py: GPT-2
shape, d 256, batch 8 x 128): ~22,000 faults (86 MiB) per LoRA step and ~12,000 per full
fine-tuning step under the default policy; none once :func:`keep_freed_memory` has run.

:func:`keep_freed_memory` raises both thresholds with ``mallopt`` (the programmatic form of the
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment variables), so freed activation memory
stays in the heap for the next step; the process's resident size stays at its peak, as with
PyTorch's caching allocator. Nothing changes in any result. It is a no-op (False) where the C
library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: in effect, never hand the heap top back

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory (module docstring); True when it took effect.
    Idempotent; safe to call from anywhere before or after arrays exist."""
    global _done
    if _done is None:
        _done = False
        try:
            name = ctypes.util.find_library("c")
            libc = ctypes.CDLL(name) if name else None
            mallopt = getattr(libc, "mallopt", None)
            if mallopt is not None:
                mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                mallopt.restype = ctypes.c_int
                ok_mmap = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                ok_trim = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                _done = ok_mmap and ok_trim
        except OSError:
            _done = False
    return _done
