"""Keep freed host memory in the process, so that CPU training steps stop page-faulting.

glibc's malloc serves blocks above a threshold (at most 32 MiB) with fresh `mmap`s and gives
them back to the kernel when freed, and trims freed memory at the top of its heap. A CPU training
step allocates and frees the same activation-sized tensors every step, so without this each step
faults its activations in again, page by page, from zeroed kernel pages (the cost is measured in
docs/benchmarks.md). With mmap off and trimming out of reach, freed blocks stay in malloc's heap
for the next step (tests/test_host_memory.py counts the faults), and the process's memory is held
at its peak, as it is during a step anyway. train.py and evaluate.py call it on CPU runs.
"""

from __future__ import annotations

import ctypes
import sys

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; returns whether it took (False on
    other C libraries and platforms, where nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Large blocks come from the heap (glibc still falls back to
    # mmap when the heap cannot grow); the heap is trimmed only past 2 GiB of free top memory.
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
