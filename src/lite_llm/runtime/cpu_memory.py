"""Keep freed CPU memory in the process, so training steps reuse pages instead of faulting in new ones.

Why: glibc's ``malloc`` serves every allocation above 32 MiB with a fresh ``mmap`` and gives
it back with ``munmap`` when freed.  A training step allocates its activations and weight
gradients anew each time (an E=512 MoE layer: ~4 GB per step), so every step page-faults all
of that memory in again and the kernel zeroes it first.  On the 2-core VMs this project is
measured on, that system time was half of an E=512 step and its most variable part (1.6-2.6 s
per step; 1.13 s with memory kept, benchmarks/moe_dispatch.py, BENCHMARKS.md).  CUDA avoids
this with a caching allocator; PyTorch has none for CPU, and jemalloc/tcmalloc are not on
every machine, but glibc can be told to behave like one: never ``mmap`` (allocate from the
heap) and never trim the heap back to the OS.

The cost: the process keeps its peak memory until it exits.  That is what a training process
wants; a long-lived notebook that trains once and then does other work may not.

``keep_freed_memory()`` changes process-wide ``malloc`` settings, for allocations made after
the call; the same effect at start-up without code is
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<bytes>``.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

# mallopt is glibc's; macOS, Windows and musl have no such knob.
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no ``mmap`` for large blocks, no heap trimming).

    Returns True when the setting is in effect (now or from an earlier call), False where the
    C library is not glibc (macOS, Windows, musl), which is then left untouched.  Idempotent.
    """
    global _applied
    if _applied:
        return True
    if not GLIBC:
        return False
    libc = ctypes.CDLL(None)  # this process's own symbols: glibc's mallopt
    # mallopt returns 1 on success.  The trim threshold is an int argument that glibc reads
    # as size_t, so -1 means "never trim".
    _applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    return _applied


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS now (glibc ``malloc_trim``), unless
    :func:`keep_freed_memory` asked to keep it.  Blocks of up to 32 MiB come from the heap and
    stay resident after they are freed; a phase that frees many of them (the streamed
    validation's float64 blocks) calls this so the next phase's peak is not added to them."""
    if GLIBC and not _applied:
        ctypes.CDLL(None).malloc_trim(0)
