"""glibc heap settings for long CPU runs: keep peak memory from creeping with the step count."""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"  # glibc's own variable; a user who sets it keeps their value


def cap_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mmap, returned to the OS on free.

    Why: glibc raises its mmap threshold after the first large frees (up to 32 MiB), after which the 1 to 50 MB
    activation tensors of each step come from the heap, which fragments and never shrinks. Measured on the CPU
    recipes: peak RSS grows with the step count (docs/results.md). A fixed threshold turns that off.
    Returns whether it was applied: not on non-glibc systems, and not when ``MALLOC_MMAP_THRESHOLD_`` is set.
    """
    if os.environ.get(ENV_OVERRIDE) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # musl and other libcs have no libc.so.6 / mallopt
        return False
