"""Process settings that make CPU work faster; the CLI and the benchmarks apply them at start.

Keeping freed memory. Every tensor of a ViT forward pass is large (ViT-S/16 at batch 32: 19-39 MB
per activation), and glibc serves such sizes with fresh mmap()ed pages that it unmaps again on
free. Every new activation then costs a page fault and a kernel zeroing per 4 KiB page before the
operation that writes it can run (`docs/results.md` gives the cost measured on one CPU).
`keep_freed_memory` tells glibc to serve large blocks from its heap and not to give freed
heap memory back, so a process in a steady loop (training or inference steps) reuses its pages;
the resident size then stays near the peak, as with PyTorch's CUDA caching allocator.
`VITKIT_MALLOC=system` leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_LARGE = 2**31 - 1  # mallopt takes a C int; "never" in practice


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory (see the module text). Returns whether it is in effect:
    False off Linux/glibc or with VITKIT_MALLOC=system. Applied once per process."""
    choice = os.environ.get("VITKIT_MALLOC", "keep")
    if choice not in ("keep", "system"):
        raise ValueError(f"VITKIT_MALLOC={choice!r}: expected 'keep' or 'system'")
    if choice == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = bool(mallopt(_M_MMAP_THRESHOLD, _LARGE)) and bool(mallopt(_M_TRIM_THRESHOLD, _LARGE))
    log.info("glibc malloc keeps freed memory: %s", applied)
    return applied
