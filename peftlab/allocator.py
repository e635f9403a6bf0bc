"""glibc's allocator, set to keep the memory a CPU training step frees for the next step.

A CPU training step allocates and frees activation-sized tensors by the hundred (a MiniLM LoRA step at batch 32:
about a thousand, most of 0.1-2 MB). glibc serves a block above its mmap threshold (128 KB at start; it grows to the
largest block freed so far) with fresh pages from the kernel and returns them at free, and trims the heap's free top
above 128 KB: so a step keeps faulting in, and zeroing, pages it just gave back. Raising the mmap threshold to
glibc's ceiling (32 MB on 64-bit) and the trim threshold to 1 GB keeps those blocks in the heap (what that buys a
training step: benchmarks/SPEED.md, "Cuts"). The cost is a resident size that stays near its peak rather than
falling between steps. PyTorch's CPU performance guides give the same advice through `MALLOC_MMAP_THRESHOLD_` or a
preloaded jemalloc/tcmalloc; here it is set at run time, through `mallopt`, so `python` and `accelerate launch` get
it without an environment to set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest accepted value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (see the module docstring); False where the C library
    is not glibc (macOS, musl), which is left as it is."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
